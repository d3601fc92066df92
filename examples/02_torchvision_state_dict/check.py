"""Load the converted file with torch and torchvision alone and check it against the original checkpoint."""

import sys

sys.modules["bnmove"] = None  # from here on `import bnmove` fails: the file must load without it

import torch  # noqa: E402 (after the line that blocks bnmove)
from torchvision.models import resnet18  # noqa: E402

original = resnet18(num_classes=10)
original.load_state_dict(torch.load("resnet18.pt", weights_only=True))
original.eval()
# A whole module: unpickling runs code, so only for files you trust (here: bnmove's own output).
converted = torch.load("resnet18.after.pt", weights_only=False)
converted.eval()  # built from a state dict, it keeps the builder's train mode, as yours would

x = torch.randn(4, 3, 64, 64)
with torch.no_grad():
    error = (converted(x) - original(x)).abs().max().item()
print(f"class: {type(converted).__module__}.{type(converted).__name__}, loaded without bnmove")
print(f"bn1 is now: {type(converted.bn1).__name__}({', '.join(type(m).__name__ for m in converted.bn1)})")
print(f"max abs difference on 4 random inputs: {error:.1e}")
assert error < 1e-4

"""The converted model is still timm's: its own methods work, and its outputs are the original's."""

import timm
import torch
from safetensors.torch import load_file

original = timm.create_model("mobilenetv3_small_050", num_classes=10)
original.load_state_dict(load_file("mobilenetv3.safetensors"))
original.eval()
converted = torch.load("mobilenetv3.after.pt", weights_only=False).eval()  # bnmove's own file

x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    features = (converted.forward_features(x) - original.forward_features(x)).abs().max().item()
    logits = (converted(x) - original(x)).abs().max().item()
print(
    f"class: {type(converted).__name__}, pretrained_cfg kept: {converted.pretrained_cfg == original.pretrained_cfg}"
)
print(f"forward_features max abs difference: {features:.1e}; logits: {logits:.1e}")
converted.reset_classifier(5)  # timm's API on the converted model
print(f"reset_classifier(5): {converted(x).shape[1]} classes")
assert features < 1e-4 and logits < 1e-4

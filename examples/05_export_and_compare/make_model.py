"""Write net.pt: the state dict of a MobileNetV3-style sample model (depthwise convs, Hardswish),
and net_after.pt: its exact after-variant trained on for a few batches, as a whole module."""

import torch

import bnmove
from bnmove.sample_models import mobilenet


def train_batches(model: torch.nn.Module) -> None:
    """A few batches in train mode give the BNs running statistics, as training would."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    model.eval()


torch.manual_seed(0)
model = mobilenet()
train_batches(model)
torch.save(model.state_dict(), "net.pt")
print("wrote net.pt (bnmove.sample_models:mobilenet, 3x32x32 inputs, 10 classes)")

# The exact after-variant's BNs pass their input through in eval until training moves their
# statistics: after these batches they carry maps of their own, as a fine-tuned model's do.
after = bnmove.convert(model, "after", method="exact").model
train_batches(after)
torch.save(after, "net_after.pt")
print("wrote net_after.pt (the after-variant, trained on for 3 batches; a whole module)")

"""Write net.pt: the state dict of a MobileNetV3-style sample model (depthwise convs, Hardswish)."""

import torch

from bnmove.sample_models import mobilenet

torch.manual_seed(0)
model = mobilenet()
model.train()
with torch.no_grad():  # a few batches give the BNs running statistics, as training would
    for _ in range(3):
        model(torch.randn(8, 3, 32, 32))
torch.save(model.state_dict(), "net.pt")
print("wrote net.pt (bnmove.sample_models:mobilenet, 3x32x32 inputs, 10 classes)")

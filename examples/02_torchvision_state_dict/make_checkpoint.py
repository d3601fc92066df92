"""Write resnet18.pt: a torchvision ResNet-18 state dict for 10 classes, as training would leave it."""

import torch
from torchvision.models import resnet18

torch.manual_seed(0)
model = resnet18(num_classes=10)
model.train()
with torch.no_grad():  # a few batches give the BNs running statistics, as training would
    for _ in range(3):
        model(torch.randn(8, 3, 64, 64))
torch.save(model.state_dict(), "resnet18.pt")
print("wrote resnet18.pt (state dict of torchvision's resnet18, 10 classes)")

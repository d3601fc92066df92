"""Write mobilenetv3.safetensors: timm's mobilenetv3_small_050 for 10 classes, as training would leave it."""

import timm
import torch
from safetensors.torch import save_file

torch.manual_seed(0)
model = timm.create_model("mobilenetv3_small_050", num_classes=10)
model.train()
with torch.no_grad():  # a few batches give the BNs running statistics, as training would
    for _ in range(3):
        model(torch.randn(8, 3, 64, 64))
save_file(model.state_dict(), "mobilenetv3.safetensors")
print("wrote mobilenetv3.safetensors (timm mobilenetv3_small_050, 10 classes)")

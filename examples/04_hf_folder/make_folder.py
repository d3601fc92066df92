"""Write hf-resnet/: a small Hugging Face ResNet saved with save_pretrained (built from a config, no download)."""

import torch
from transformers import ResNetConfig, ResNetForImageClassification
from transformers.utils import logging

logging.disable_progress_bar()

torch.manual_seed(0)
config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)
model = ResNetForImageClassification(config)
model.train()
with torch.no_grad():  # a few batches give the BNs running statistics, as training would
    for _ in range(3):
        model(torch.randn(8, 3, 64, 64))
model.eval().save_pretrained("hf-resnet")
print("wrote hf-resnet/ (ResNetForImageClassification, 10 labels)")

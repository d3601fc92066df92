"""The converted model is still a transformers model: same class, config, outputs and hidden states."""

import torch
from transformers import ResNetForImageClassification
from transformers.utils import logging

logging.disable_progress_bar()

original = ResNetForImageClassification.from_pretrained("hf-resnet").eval()
converted = torch.load("hf-resnet.after.pt", weights_only=False).eval()  # bnmove's own file

x = torch.randn(2, 3, 64, 64)
with torch.no_grad():
    want = original(x, output_hidden_states=True)
    got = converted(x, output_hidden_states=True)
logits = (got.logits - want.logits).abs().max().item()
hidden = max((g - w).abs().max().item() for g, w in zip(got.hidden_states, want.hidden_states, strict=True))
print(f"class: {type(converted).__name__}, config: {type(converted.config).__name__}")
print(f"logits max abs difference: {logits:.1e}; hidden states: {hidden:.1e}")
assert logits < 1e-4 and hidden < 1e-4

"""The converted model is still a transformers model: same class, config, outputs and hidden states;
and the folder `--format hf` wrote loads with from_pretrained in the converted placement."""

import torch
from transformers import AutoModelForImageClassification, ResNetForImageClassification
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

# the folder: transformers runs its modeling_bnmove.py, which needs torch and transformers only
folder = AutoModelForImageClassification.from_pretrained("hf-resnet.after", trust_remote_code=True).eval()
with torch.no_grad():
    same = (folder(x).logits - got.logits).abs().max().item()
print(f"from_pretrained folder: {type(folder).__name__} (a {type(folder).__mro__[1].__name__}),")
print(f"logits as the whole-module file's: max abs difference {same:.1e}")
assert isinstance(folder, ResNetForImageClassification) and same == 0.0

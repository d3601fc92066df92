"""Write digits-png/<class>/*.png (scikit-learn's 8x8 digits as image files) and net.pt (a state dict).

An image folder is what most people have; the study reads it as it reads yours: one folder per
class (or train/ and val/ folders holding them), decoded with Pillow.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from bnmove.sample_models import digits_net

digits = load_digits()
root = Path("digits-png")
for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
    folder = root / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
torch.manual_seed(0)
torch.save(digits_net().state_dict(), "net.pt")
print(
    f"wrote {len(digits.images)} images in {len(set(digits.target))} class folders under {root}/, and net.pt"
)

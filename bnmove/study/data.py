"""Training and calibration data from files: ``.npz`` with ``x``/``y``, folders of them, or ``digits``.

``digits`` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
a real dataset that ships inside the package (``pip install scikit-learn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import BnmoveError


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Dataset:
    """A train and a validation split of float inputs and integer class labels."""

    train: Split
    val: Split
    name: str
    #: what loading did to the data that the user should know (the CLI prints these)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(max(self.train.y.max(), self.val.y.max())) + 1


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BnmoveError("--data digits needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # N x 1 x 8 x 8 in [0, 1]
    return x, digits.target.astype(np.int64)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BnmoveError(f"{path}: not a readable .npz archive ({exc})") from exc
    if isinstance(loaded, np.ndarray):  # a .npy: one array, no labels
        raise BnmoveError(
            f"{path}: is a single array (.npy) without labels; training needs an .npz with x and y "
            "(np.savez(path, x=images, y=labels))"
        )
    with loaded as archive:
        return {k: archive[k] for k in archive.files}


def _arrays_from(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise BnmoveError(f"{path}: no .npz files in this folder")
        parts = [_read_npz(f) for f in files]
        keys = set(parts[0])
        if any(set(p) != keys for p in parts):
            raise BnmoveError(f"{path}: the .npz files hold different arrays")
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}
    if not path.exists():
        raise BnmoveError(f"{path}: no such file or folder (or give --data digits)")
    return _read_npz(path)


def _check(x: np.ndarray, y: np.ndarray, where: str) -> Split:
    if x.ndim < 2:
        raise BnmoveError(f"{where}: x must have a batch dimension and features, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise BnmoveError(f"{where}: y must be one label per sample ({len(x)}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise BnmoveError(f"{where}: y must hold integer class labels, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise BnmoveError(f"{where}: labels must be >= 0, found {int(y.min())}")
    if not np.issubdtype(x.dtype, np.number):
        raise BnmoveError(f"{where}: x must be numeric, got {x.dtype}")
    if x.dtype == np.uint8:  # 8-bit images: train on [0, 1], as image pipelines do
        x = x.astype(np.float32) / 255.0
    return Split(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
    )


def load_dataset(spec: str | Path, *, val_split: float = 0.2, seed: int = 0) -> Dataset:
    """``"digits"``, an ``.npz`` (``x``, ``y``, optionally ``x_val``, ``y_val``), or a folder of them.

    Without validation arrays, a seeded ``val_split`` fraction is held out.
    """
    if not 0 < val_split < 1:
        raise BnmoveError(f"validation split must be between 0 and 1, got {val_split}")
    if str(spec) == "digits":
        x, y = load_digits_arrays()
        arrays = {"x": x, "y": y}
        name = "digits"
    else:
        path = Path(spec)
        arrays = _arrays_from(path)
        name = path.name
        missing = [k for k in ("x", "y") if k not in arrays]
        if missing:
            raise BnmoveError(
                f"{path}: missing array(s) {', '.join(missing)}; expected x and y (and optionally x_val, y_val)"
            )
    notes = (
        [f"{name}: x holds 8-bit values (uint8); scaled to [0, 1] by dividing by 255"]
        if arrays["x"].dtype == np.uint8
        else []
    )
    train = _check(arrays["x"], arrays["y"], name)
    if len(train.y) < 2:
        raise BnmoveError(f"{name}: needs at least 2 samples")
    if "x_val" in arrays and "y_val" in arrays:
        val = _check(arrays["x_val"], arrays["y_val"], f"{name} (validation)")
        if val.x.shape[1:] != train.x.shape[1:]:
            raise BnmoveError(
                f"{name}: x_val samples have shape {tuple(val.x.shape[1:])}, x has {tuple(train.x.shape[1:])}"
            )
        return Dataset(train, val, name, notes)
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(order) * val_split))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return Dataset(
        Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx]), name, notes
    )

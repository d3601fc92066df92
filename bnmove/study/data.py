"""Training and calibration data from files: ``.npz`` with ``x``/``y``, folders of them, image
folders, the CIFAR-10/100 "python version" folders, or ``digits``.

``digits`` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
a real dataset that ships inside the package (``pip install scikit-learn``).

Image folders (``train/<class>/*.png|jpg`` and ``val/<class>/…``, or ``<class>/…`` split by
``val_split``) are decoded with Pillow (``pip install 'bnmove[images]'``). CIFAR pickles are read
as plain arrays by an unpickler that accepts numpy arrays and nothing else, so no code in the file
can run. Image folders are streamed: each image is decoded when a batch needs it, in DataLoader
worker processes; CIFAR arrays stay in memory as 8 bits. Both are scaled to [0, 1] and normalised
per channel with the training split's mean and standard deviation, batch by batch on the training
device, so no split is ever held as one float tensor. ``torch.utils.data`` Datasets and DataLoaders
(the Python API) are streamed the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BnmoveError
from .datasets import Dataset, Split, Streamed, _held_out, _normalise
from .sources import (
    _arrays_from,
    _check,
    _is_cifar,
    _is_image_folder,
    cifar_arrays,
    image_folder,
    load_digits_arrays,
)


def _hold_out(split: Split | Streamed, val_split: float, seed: int) -> tuple[Any, Any]:
    """``(train, validation)``: a seeded random ``val_split`` fraction of ``split`` held out."""
    train_idx, val_idx = _held_out(len(split), val_split, seed)
    return split.subset(train_idx), split.subset(val_idx)


def load_dataset(
    spec: str | Path, *, val_split: float = 0.2, seed: int = 0, image_size: int | None = None
) -> Dataset:
    """``"digits"``, an ``.npz`` (``x``, ``y``, optionally ``x_val``, ``y_val``), a folder of them,
    an image folder or a CIFAR-10/100 python folder (see the module docstring).

    Without validation data, a seeded ``val_split`` fraction is held out. Image and CIFAR data are
    scaled and normalised per channel; ``image_size`` scales and centre-crops images to a square of that side
    (default: the first image's size, which every image must have).
    """
    if not 0 < val_split < 1:
        raise BnmoveError(f"validation split must be between 0 and 1, got {val_split}")
    if str(spec) == "digits":
        x, y = load_digits_arrays()
        arrays = {"x": x, "y": y}
        name = "digits"
    else:
        path = Path(spec)
        if not _is_cifar(path) and _is_image_folder(path):
            return image_folder(path, image_size, val_split=val_split, seed=seed)
        arrays = cifar_arrays(path) if _is_cifar(path) else _arrays_from(path)
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
    else:
        train, val = _hold_out(train, val_split, seed)
    dataset = Dataset(train, val, name, notes)
    return _normalise(dataset) if str(spec) != "digits" and _is_cifar(Path(spec)) else dataset


def _labels_of(items: Any) -> torch.Tensor | None:
    """Every label of a torch Dataset where it says them (``targets``, as torchvision's do)."""
    targets = getattr(items, "targets", None)
    try:
        labels = torch.as_tensor(targets, dtype=torch.int64) if targets is not None else None
    except (TypeError, ValueError, RuntimeError):
        return None
    return labels if labels is not None and labels.dim() == 1 and len(labels) == len(items) else None


def _first_pair(items: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        item = items[0]
    except Exception as exc:
        raise BnmoveError(f"{where}: reading its first item raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise BnmoveError(f"{where}: items must be (x, y) pairs, got {type(item).__name__}")
    try:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise BnmoveError(f"{where}: items must be (tensor, label) pairs ({exc})") from exc


def _streamed(source: Any, where: str) -> Streamed | Split:
    """A map-style torch Dataset (or a DataLoader's, with its workers and collate function) as a
    streamed split; an iterable-style one is read once into memory (its order cannot be set)."""
    loader = source if isinstance(source, torch.utils.data.DataLoader) else None
    items: Any = loader.dataset if loader is not None else source
    if isinstance(items, torch.utils.data.IterableDataset) or not hasattr(items, "__getitem__"):
        return _gather(source, where)
    if len(items) == 0:
        raise BnmoveError(f"{where}: holds no samples")
    x, y = _first_pair(items, where)
    if y.numel() != 1 or y.is_floating_point():
        raise BnmoveError(
            f"{where}: y must be one integer class label per item, got {tuple(y.shape)} {y.dtype}"
        )
    last, _ = _first_pair(torch.utils.data.Subset(items, [len(items) - 1]), where)
    identity = hashlib.sha256(f"{type(items).__module__}.{type(items).__qualname__} {len(items)}".encode())
    for tensor in (x, last):
        identity.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return Streamed(
        items,
        _labels_of(items),
        workers=loader.num_workers if loader is not None else 0,
        collate=loader.collate_fn if loader is not None else None,
        identity=identity.hexdigest(),
    )


def _gather(source: Any, where: str) -> Split:
    xs, ys = [], []
    try:
        for item in source:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise BnmoveError(f"{where}: items must be (x, y) pairs, got {type(item).__name__}")
            x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
            batched = isinstance(source, torch.utils.data.DataLoader)
            xs.append(x if batched else x[None])
            ys.append(y.reshape(-1))
    except BnmoveError:
        raise
    except Exception as exc:
        raise BnmoveError(f"{where}: reading it raised {type(exc).__name__}: {exc}") from exc
    if not xs:
        raise BnmoveError(f"{where}: holds no samples")
    try:
        x, y = torch.cat(xs), torch.cat(ys)
    except RuntimeError as exc:
        raise BnmoveError(f"{where}: samples of different shapes ({exc})") from exc
    return _check(x.numpy(), y.numpy(), where)


def from_torch(
    train: Any, val: Any = None, *, val_split: float = 0.2, seed: int = 0, name: str = "torch data"
) -> Dataset:
    """A [`Dataset`][bnmove.study.Dataset] from a ``torch.utils.data.Dataset`` or ``DataLoader`` of ``(x, y)`` items
    (and optionally one for validation; else a seeded ``val_split`` is held out).

    Map-style datasets are streamed: items are read batch by batch in the order bnmove sets per
    seed, with a DataLoader's workers and collate function where one is given (its own order and
    batch size are not used). Iterable-style datasets are read once into memory.
    """
    train_split = _streamed(train, f"{name} (train)")
    if val is not None:
        return Dataset(train_split, _streamed(val, f"{name} (validation)"), name)
    return Dataset(*_hold_out(train_split, val_split, seed), name)

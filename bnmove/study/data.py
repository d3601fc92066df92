"""Training and calibration data from files: ``.npz`` with ``x``/``y``, folders of them, image
folders, the CIFAR-10/100 "python version" folders, or ``digits``.

``digits`` is scikit-learn's 8x8 handwritten digits (1797 images, 10 classes),
a real dataset that ships inside the package (``pip install scikit-learn``).

Image folders (``train/<class>/*.png|jpg`` and ``val/<class>/…``, or ``<class>/…`` split by
``val_split``) are decoded with Pillow (``pip install 'bnmove[images]'``). CIFAR pickles are read
as plain arrays by an unpickler that accepts numpy arrays and nothing else, so no code in the file
can run. Both are held in memory as 8-bit images, scaled to [0, 1] and normalised per channel with
the training split's mean and standard deviation.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "test")}


def _class_folders(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise BnmoveError(f"{folder}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes[folder.name] = files
    return classes


def _decode(files: Iterable[Path], mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    images = []
    for file in files:
        try:
            with Image.open(file) as opened:
                image = opened.convert(mode)
            if size is not None and image.size != size:
                image = image.resize(size, Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise BnmoveError(f"{file}: not a readable image ({exc})") from exc
        if size is None:
            size = (array.shape[1], array.shape[0])
        elif array.shape[:2] != (size[1], size[0]):
            raise BnmoveError(f"{file}: {array.shape[1]}x{array.shape[0]}, the others {size[0]}x{size[1]}")
        images.append(array if array.ndim == 3 else array[:, :, None])
    return np.stack(images).transpose(0, 3, 1, 2)  # N x C x H x W


def image_folder_arrays(root: Path, image_size: int | None = None) -> dict[str, np.ndarray]:
    """``x``/``y`` (and ``x_val``/``y_val`` with train/val subfolders) as uint8 N x C x H x W."""
    try:
        from PIL import Image
    except ImportError:
        raise BnmoveError(
            f"{root}: reading image folders needs Pillow: pip install 'bnmove[images]'"
        ) from None
    subfolders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = next((subfolders[n] for n in _SPLIT_NAMES["train"] if n in subfolders), None)
    val_dir = next((subfolders[n] for n in _SPLIT_NAMES["val"] if n in subfolders), None)
    splits = {"": _class_folders(train_dir)} if train_dir else {"": _class_folders(root)}
    if train_dir and val_dir:
        splits["_val"] = _class_folders(val_dir)
        if set(splits["_val"]) != set(splits[""]):
            only = sorted(set(splits[""]) ^ set(splits["_val"]))
            raise BnmoveError(f"{root}: train and validation class folders differ ({', '.join(only[:5])})")
    names = sorted(splits[""])
    if len(names) < 2:
        raise BnmoveError(f"{root}: needs at least two class folders, found {len(names)}")
    every = [f for files in splits[""].values() for f in files]
    try:
        with Image.open(every[0]) as first:
            color = first.mode not in ("L", "1", "I;16", "I")
            size = (image_size, image_size) if image_size else first.size
    except OSError as exc:
        raise BnmoveError(f"{every[0]}: not a readable image ({exc})") from exc
    arrays = {}
    for suffix, classes in splits.items():
        files = [(f, label) for label, name in enumerate(names) for f in classes[name]]
        arrays[f"x{suffix}"] = _decode((f for f, _ in files), "RGB" if color else "L", size)
        arrays[f"y{suffix}"] = np.array([label for _, label in files], dtype=np.int64)
    return arrays


#: what a CIFAR batch pickle may reference: numpy's array reconstruction, nothing else
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers, and refuses anything else."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds arrays only")


def _read_cifar_batch(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as fh:
            raw = _ArraysOnly(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise BnmoveError(f"{path}: not a CIFAR batch ({exc})") from exc
    if not isinstance(raw, dict):
        raise BnmoveError(f"{path}: not a CIFAR batch (holds {type(raw).__name__})")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def cifar_arrays(root: Path) -> dict[str, np.ndarray]:
    """The CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``;
    fine labels) python-version folder as uint8 N x 3 x 32 x 32 arrays."""
    if (root / "data_batch_1").exists():
        train_files, test_files, key = sorted(root.glob("data_batch_*")), [root / "test_batch"], "labels"
    else:
        train_files, test_files, key = [root / "train"], [root / "test"], "fine_labels"
    arrays = {}
    for suffix, files in (("", train_files), ("_val", test_files)):
        xs, ys = [], []
        for file in files:
            if not file.exists():
                raise BnmoveError(f"{file}: missing from the CIFAR folder")
            batch = _read_cifar_batch(file)
            data, labels = batch.get("data"), batch.get(key)
            if not isinstance(data, np.ndarray) or labels is None:
                raise BnmoveError(f"{file}: not a CIFAR batch (no 'data' and '{key}')")
            xs.append(data.reshape(-1, 3, 32, 32).astype(np.uint8))
            ys.append(np.asarray(labels, dtype=np.int64))
        arrays[f"x{suffix}"], arrays[f"y{suffix}"] = np.concatenate(xs), np.concatenate(ys)
    return arrays


def _is_cifar(path: Path) -> bool:
    return path.is_dir() and (
        (path / "data_batch_1").exists() or ((path / "train").is_file() and (path / "meta").exists())
    )


def _is_image_folder(path: Path) -> bool:
    return (
        path.is_dir()
        and not any(path.glob("*.npz"))
        and any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob("*") if f.is_file())
    )


def _normalise(dataset: Dataset) -> Dataset:
    """Per-channel mean and standard deviation of the training split, applied to both splits."""
    x = dataset.train.x
    dims = [0, *range(2, x.dim())]
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True).clamp_min(1e-6)
    dataset.train.x = (dataset.train.x - mean) / std
    dataset.val.x = (dataset.val.x - mean) / std
    values = ", ".join(
        f"{m:.3f}/{s:.3f}" for m, s in zip(mean.flatten().tolist(), std.flatten().tolist(), strict=True)
    )
    dataset.notes.append(
        f"{dataset.name}: normalised per channel with the training split's mean/std {values}"
    )
    return dataset


def load_dataset(
    spec: str | Path, *, val_split: float = 0.2, seed: int = 0, image_size: int | None = None
) -> Dataset:
    """``"digits"``, an ``.npz`` (``x``, ``y``, optionally ``x_val``, ``y_val``), or a folder of them.

    Without validation arrays, a seeded ``val_split`` fraction is held out.
    Image folders and CIFAR folders (see the module docstring) are scaled and normalised per
    channel; ``image_size`` resizes images to a square of that side (default: the first image's size).
    """
    if not 0 < val_split < 1:
        raise BnmoveError(f"validation split must be between 0 and 1, got {val_split}")
    images = False
    if str(spec) == "digits":
        x, y = load_digits_arrays()
        arrays = {"x": x, "y": y}
        name = "digits"
    else:
        path = Path(spec)
        images = _is_cifar(path) or _is_image_folder(path)
        if _is_cifar(path):
            arrays = cifar_arrays(path)
        elif images:
            arrays = image_folder_arrays(path, image_size)
        else:
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
        return _finish(Dataset(train, val, name, notes), images)
    order = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(order) * val_split))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return _finish(
        Dataset(
            Split(train.x[train_idx], train.y[train_idx]),
            Split(train.x[val_idx], train.y[val_idx]),
            name,
            notes,
        ),
        images,
    )


def _finish(dataset: Dataset, images: bool) -> Dataset:
    return _normalise(dataset) if images else dataset


def from_torch(
    train: Any, val: Any = None, *, val_split: float = 0.2, seed: int = 0, name: str = "torch data"
) -> Dataset:
    """A :class:`Dataset` from a ``torch.utils.data.Dataset`` or ``DataLoader`` of ``(x, y)`` items
    (and optionally one for validation; else a seeded ``val_split`` is held out).

    The items are gathered into memory (streaming is not built yet); ``x`` must be tensors of one
    shape, ``y`` integer class labels.
    """

    def gather(source: Any, where: str) -> Split:
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

    train_split = gather(train, f"{name} (train)")
    if val is not None:
        return Dataset(train_split, gather(val, f"{name} (validation)"), name)
    order = torch.randperm(len(train_split.y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(order) * val_split))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x, y = train_split.x, train_split.y
    return Dataset(Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx]), name)

"""Reading data sets from files: digits, ``.npz`` arrays, image folders, CIFAR pickles (arrays only)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import BnmoveError
from .datasets import Dataset, Normalise, Split, Streamed, _held_out, _normalise


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
    labels = torch.from_numpy(y.astype(np.int64))
    if x.dtype == np.uint8:  # 8-bit images: kept as bytes, trained on [0, 1] (scaled batch by batch)
        return Split(torch.from_numpy(np.ascontiguousarray(x)), labels, Normalise(255.0))
    return Split(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), labels)


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


class ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded one by one with Pillow: ``(uint8 C x H x W tensor, label)`` items."""

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], mode: str, size: tuple[int, int]
    ) -> None:
        self.files, self.labels, self.mode, self.size = list(files), list(labels), mode, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageOps, UnidentifiedImageError

        file = self.files[index]
        try:
            with Image.open(file) as opened:
                image = opened.convert(self.mode)
            if image.size != self.size:  # scaled to cover the size, then centre-cropped: no distortion
                image = ImageOps.fit(image, self.size, Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise BnmoveError(f"{file}: not a readable image ({exc})") from exc
        array = array if array.ndim == 3 else array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy()), self.labels[index]


def _workers() -> int:
    """DataLoader workers for decoding images: the cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _image_split(files: list[tuple[Path, int]], mode: str, size: tuple[int, int], resize: bool) -> Streamed:
    """The split's files checked by their headers (readable; one size unless resized) before any
    training, then streamed."""
    from PIL import Image, UnidentifiedImageError

    identity = hashlib.sha256()
    for file, label in files:
        try:
            with Image.open(file) as opened:
                found = opened.size
        except (OSError, UnidentifiedImageError) as exc:
            raise BnmoveError(f"{file}: not a readable image ({exc})") from exc
        if not resize and found != size:
            raise BnmoveError(
                f"{file}: {found[0]}x{found[1]}, the others {size[0]}x{size[1]} "
                "(--image-size resizes every image to one size)"
            )
        stat = file.stat()
        identity.update(f"{file}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\0{found}\n".encode())
    return Streamed(
        ImageFiles([f for f, _ in files], [label for _, label in files], mode, size),
        torch.tensor([label for _, label in files], dtype=torch.int64),
        Normalise(255.0),
        workers=_workers(),
        identity=identity.hexdigest(),
    )


def image_folder(
    root: Path, image_size: int | None = None, *, val_split: float = 0.2, seed: int = 0
) -> Dataset:
    """An image folder (``train/<class>/…`` and ``val/<class>/…``, or ``<class>/…`` split by a
    seeded ``val_split``) as streamed splits of 8-bit images, scaled and centre-cropped to
    ``image_size`` squares (default: every image must have the first one's size)."""
    try:
        from PIL import Image
    except ImportError:
        raise BnmoveError(
            f"{root}: reading image folders needs Pillow: pip install 'bnmove[images]'"
        ) from None
    subfolders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    train_dir = next((subfolders[n] for n in _SPLIT_NAMES["train"] if n in subfolders), None)
    val_dir = next((subfolders[n] for n in _SPLIT_NAMES["val"] if n in subfolders), None)
    train_classes = _class_folders(train_dir) if train_dir else _class_folders(root)
    names = sorted(train_classes)
    if len(names) < 2:
        raise BnmoveError(f"{root}: needs at least two class folders, found {len(names)}")
    val_classes = _class_folders(val_dir) if train_dir and val_dir else None
    if val_classes is not None and set(val_classes) != set(train_classes):
        only = sorted(set(train_classes) ^ set(val_classes))
        raise BnmoveError(f"{root}: train and validation class folders differ ({', '.join(only[:5])})")
    first = train_classes[names[0]][0]
    try:
        with Image.open(first) as opened:
            mode = "L" if opened.mode in ("L", "1", "I;16", "I") else "RGB"
            size = (image_size, image_size) if image_size else opened.size
    except OSError as exc:
        raise BnmoveError(f"{first}: not a readable image ({exc})") from exc

    def labelled(classes: dict[str, list[Path]]) -> list[tuple[Path, int]]:
        return [(f, label) for label, name in enumerate(names) for f in classes[name]]

    train_files = labelled(train_classes)
    if val_classes is not None:
        val_files = labelled(val_classes)
    else:
        train_idx, val_idx = _held_out(len(train_files), val_split, seed)
        val_files = [train_files[i] for i in sorted(val_idx)]
        train_files = [train_files[i] for i in sorted(train_idx)]
    resize = bool(image_size)
    dataset = Dataset(
        _image_split(train_files, mode, size, resize), _image_split(val_files, mode, size, resize), root.name
    )
    return _normalise(dataset)


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

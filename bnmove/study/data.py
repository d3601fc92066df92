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
import multiprocessing
import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BnmoveError


@dataclass(frozen=True)
class Normalise:
    """What a batch of stored inputs goes through on the training device: ``x / divisor`` (255 for
    8-bit images), then ``(x - mean) / std`` per channel (dimension 1) where given."""

    divisor: float = 1.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.divisor != 1.0:
            x = x / self.divisor
        if self.mean is not None and self.std is not None:
            shape = (1, -1, *([1] * (x.dim() - 2)))
            mean = torch.tensor(self.mean, device=x.device).view(shape)
            std = torch.tensor(self.std, device=x.device).view(shape)
            x = (x - mean) / std
        return x


Batches = Callable[[torch.Tensor], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _prepared(prepare: Normalise | None, x: torch.Tensor) -> torch.Tensor:
    return prepare(x) if prepare is not None else x


def _held_out(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices: a seeded random ``val_split`` fraction (at least one) held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(n * val_split))
    return order[n_val:], order[:n_val]


def _chunks(order: torch.Tensor, batch_size: int, train: bool) -> list[torch.Tensor]:
    """``order`` cut into mini-batches; in training a last batch of one sample is dropped
    (BatchNorm cannot train on a single sample)."""
    chunks = list(order.split(batch_size))
    return chunks[:-1] if train and chunks and len(chunks[-1]) < 2 else chunks


@dataclass
class Split:
    """Inputs and labels held in memory (``x`` as stored: float, or 8-bit with ``prepare``)."""

    x: torch.Tensor
    y: torch.Tensor
    #: applied batch by batch on the training device (8-bit images: scaling and normalisation)
    prepare: Normalise | None = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> torch.Tensor | None:
        return self.y

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs, as the model sees them."""
        return _prepared(self.prepare, self.x[:n])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every input (as the model sees it) and label, as two tensors."""
        return self.head(len(self)), self.y

    def batches(self, batch_size: int, device: torch.device, *, train: bool) -> Batches:
        """A function from a sample order to ``(x, y)`` mini-batches on ``device``; the split is
        moved there once."""
        x, y = self.x.to(device), self.y.to(device)

        def epoch(order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in _chunks(order.to(device), batch_size, train):
                yield _prepared(self.prepare, x[idx]), y[idx]

        return epoch

    def subset(self, indices: list[int]) -> Split:
        return Split(self.x[indices], self.y[indices], self.prepare)

    def fingerprint(self, digest: Any) -> None:
        for tensor in (self.x, self.y):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(repr(self.prepare).encode())


_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


class _Order(torch.utils.data.Sampler[list[int]]):
    """The mini-batches of the current epoch's order (set before each epoch, read in the main
    process), so one DataLoader with persistent workers serves every epoch."""

    def __init__(self, batch_size: int, train: bool) -> None:
        self.batch_size, self.train = batch_size, train
        self.order = torch.zeros(0, dtype=torch.long)

    def __iter__(self) -> Iterator[list[int]]:
        return (c.tolist() for c in _chunks(self.order, self.batch_size, self.train))

    def __len__(self) -> int:
        return len(_chunks(self.order, self.batch_size, self.train))


class _Pairs:
    """Collates ``(x, y, ...)`` items into an ``(x, y)`` batch with the source's own collate function."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None) -> None:
        self.collate = collate or torch.utils.data.default_collate

    def __call__(self, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.collate(items)
        return torch.as_tensor(batch[0]), torch.as_tensor(batch[1]).reshape(-1)


@dataclass
class Streamed:
    """A split read item by item through a ``DataLoader``: a map-style ``torch.utils.data.Dataset``
    of ``(x, y)`` items, decoded by ``workers`` processes, pinned and moved batch by batch."""

    items: torch.utils.data.Dataset[Any]
    #: every label, where known without reading the items (image folders, ``targets``); else None
    known_labels: torch.Tensor | None
    prepare: Normalise | None = None
    workers: int = 0
    collate: Callable[[list[Any]], Any] | None = None
    #: what the items are (paths, sizes and times of image files; type, length and first items of a
    #: torch Dataset): a resumed study is refused when it changes
    identity: str = ""

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    @property
    def labels(self) -> torch.Tensor | None:
        return self.known_labels

    def head(self, n: int) -> torch.Tensor:
        x, _ = _Pairs(self.collate)([self.items[i] for i in range(min(n, len(self)))])
        return _prepared(self.prepare, x)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every input (as the model sees it) and label, as two tensors: reads every item, so for
        small data only (tests, quick checks)."""
        epoch = self.batches(256, torch.device("cpu"), train=False)
        xs, ys = zip(*epoch(torch.arange(len(self))), strict=True)
        return torch.cat(xs), torch.cat(ys)

    def batches(self, batch_size: int, device: torch.device, *, train: bool) -> Batches:
        order = _Order(batch_size, train)
        loader = torch.utils.data.DataLoader(
            self.items,
            batch_sampler=order,
            num_workers=self.workers,
            collate_fn=_Pairs(self.collate),
            pin_memory=device.type == "cuda",
            persistent_workers=self.workers > 0,
            # fork, as torch does by default on Linux, also inside a study's spawned worker processes
            # (which would otherwise spawn these too: seconds per loader); workers never touch CUDA
            multiprocessing_context=_FORK if self.workers > 0 else None,
        )

        def epoch(indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            order.order = indices.cpu()
            for x, y in loader:
                yield (
                    _prepared(self.prepare, x.to(device, non_blocking=True)),
                    y.to(device, non_blocking=True),
                )

        return epoch

    def subset(self, indices: list[int]) -> Streamed:
        identity = hashlib.sha256(f"{self.identity} {indices}".encode()).hexdigest()
        labels = self.known_labels[indices] if self.known_labels is not None else None
        return Streamed(
            torch.utils.data.Subset(self.items, indices),
            labels,
            self.prepare,
            self.workers,
            self.collate,
            identity,
        )

    def fingerprint(self, digest: Any) -> None:
        digest.update(self.identity.encode())
        digest.update(repr(self.prepare).encode())


@dataclass
class Dataset:
    """A train and a validation split of inputs and integer class labels, in memory
    (:class:`Split`) or streamed (:class:`Streamed`)."""

    train: Split | Streamed
    val: Split | Streamed
    name: str
    #: what loading did to the data that the user should know (the CLI prints these)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        """Highest label + 1, where the labels are known without reading every item."""
        known = [s.labels for s in (self.train, self.val)]
        if any(labels is None for labels in known):
            return None
        return int(max(int(labels.max()) for labels in known if labels is not None and len(labels))) + 1

    def sample(self, n: int = 2) -> torch.Tensor:
        """The first ``n`` training inputs as the model sees them (to probe or trace the model)."""
        return self.train.head(n)


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


#: training images read to estimate the normalisation statistics of a streamed split
STATISTICS_SAMPLES = 10_000


def _channel_statistics(split: Split | Streamed) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """Per-channel mean and (unbiased) standard deviation of the training inputs after scaling,
    accumulated in float64 batch by batch; a streamed split reads at most ``STATISTICS_SAMPLES``
    evenly spaced images. Returns them with the number of images read."""
    n = len(split)
    if isinstance(split, Split):
        prepare = split.prepare or Normalise()
        chunks: Iterable[torch.Tensor] = (prepare(x) for x in split.x.split(4096))
        count = n
    else:
        step = max(1, -(-n // STATISTICS_SAMPLES))
        picked = torch.arange(0, n, step)
        count = len(picked)
        epoch = split.batches(256, torch.device("cpu"), train=False)
        chunks = (x for x, _ in epoch(picked))
    total = total_sq = None
    values = 0
    for chunk in chunks:  # scaled by the split's prepare (not yet normalised)
        x = chunk.double()
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat**2).sum(1) if total_sq is None else total_sq + (flat**2).sum(1)
        values += flat.shape[1]
    assert total is not None and total_sq is not None
    mean = total / values
    var = ((total_sq - values * mean**2) / max(values - 1, 1)).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-6).tolist()), count


def _normalise(dataset: Dataset) -> Dataset:
    """Per-channel mean and standard deviation of the training split (after scaling 8-bit values to
    [0, 1]), applied to both splits batch by batch."""
    mean, std, count = _channel_statistics(dataset.train)
    prepare = Normalise(255.0, mean, std)
    dataset.train.prepare = prepare
    dataset.val.prepare = prepare
    values = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(mean, std, strict=True))
    of = "" if count == len(dataset.train) else f" (from {count} evenly spaced images)"
    dataset.notes.append(
        f"{dataset.name}: normalised per channel with the training split's mean/std {values}{of}"
    )
    return dataset


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
    """A :class:`Dataset` from a ``torch.utils.data.Dataset`` or ``DataLoader`` of ``(x, y)`` items
    (and optionally one for validation; else a seeded ``val_split`` is held out).

    Map-style datasets are streamed: items are read batch by batch in the order bnmove sets per
    seed, with a DataLoader's workers and collate function where one is given (its own order and
    batch size are not used). Iterable-style datasets are read once into memory.
    """
    train_split = _streamed(train, f"{name} (train)")
    if val is not None:
        return Dataset(train_split, _streamed(val, f"{name} (validation)"), name)
    return Dataset(*_hold_out(train_split, val_split, seed), name)

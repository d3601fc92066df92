"""What a data set is in bnmove: splits held in memory or streamed, normalised batch by batch."""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


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
    #: the split's copy on each GPU it was trained on (made once)
    _copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
        moved there once per device, however many runs and passes ask for it."""
        x, y = self._on(device)

        def epoch(order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in _chunks(order.to(device), batch_size, train):
                yield _prepared(self.prepare, x[idx]), y[idx]

        return epoch

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type == "cpu":
            return self.x, self.y
        copies = self.__dict__.setdefault("_copies", {})  # (a Split unpickled from before it had them)
        if str(device) not in copies:
            copies[str(device)] = (self.x.to(device), self.y.to(device))
        result: tuple[torch.Tensor, torch.Tensor] = copies[str(device)]
        return result

    def __getstate__(self) -> dict[str, Any]:  # device copies stay in the process that made them
        return {**self.__dict__, "_copies": {}}

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
    (`Split`) or streamed (`Streamed`)."""

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

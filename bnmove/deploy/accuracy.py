"""Top-1 accuracy of exported variants on the user's labelled data, paired against the reference.

Every variant sees the same samples, so a variant is compared with the reference by the
per-sample difference of correctness, ``d_i = c_variant,i − c_reference,i``: its mean and 95%
Student-t interval, computed by the study's `bnmove.study.stats.paired_difference`
(samples instead of seeds). Each variant's own accuracy gets a 95% Wilson score interval, which
stays inside [0, 1] and is right at accuracies near 100%, where the normal approximation is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import BnmoveError
from ..study.stats import paired_difference

#: two-sided 95% quantile of the standard normal distribution
_Z975 = 1.959964


class _Session(Protocol):
    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]: ...

    def static_batch(self) -> int | None: ...


@dataclass(frozen=True)
class Accuracy:
    """A variant's top-1 accuracy on labelled samples, with its difference from the reference."""

    variant: str
    samples: int
    correct: int
    #: 95% Wilson score interval of the accuracy
    low: float
    high: float
    #: accuracy minus the reference's on the same samples, with its 95% interval (None for the
    #: reference itself)
    difference: float | None = None
    difference_low: float | None = None
    difference_high: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy}


def wilson_interval(correct: int, samples: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``correct / samples``."""
    p = correct / samples
    z2 = _Z975**2
    centre = (p + z2 / (2 * samples)) / (1 + z2 / samples)
    half = _Z975 * math.sqrt(p * (1 - p) / samples + z2 / (4 * samples**2)) / (1 + z2 / samples)
    return max(0.0, centre - half), min(1.0, centre + half)


def labelled_batches(
    data: Any, samples: int | None, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` batches as numpy arrays: the validation split of a [`bnmove.study.Dataset`][bnmove.study.Dataset]
    (what ``--data`` reads), its first ``samples`` samples when given; or an ``(x, y)`` pair."""
    from ..study.data import Dataset, load_dataset

    if isinstance(data, (str, Path)):
        data = load_dataset(data)
    if isinstance(data, Dataset):
        split = data.val
        n = len(split) if samples is None else min(samples, len(split))
        order = torch.arange(n)
        for x, y in split.batches(batch_size, torch.device("cpu"), train=False)(order):
            yield x.float().numpy(), y.numpy()
        return
    if not (isinstance(data, Sequence) and len(data) == 2):
        raise BnmoveError("labelled data: give what --data takes, a bnmove Dataset, or an (x, y) pair")
    x_all, y_all = (np.asarray(t.numpy() if isinstance(t, torch.Tensor) else t) for t in data)
    if len(x_all) != len(y_all):
        raise BnmoveError(f"labelled data: {len(x_all)} inputs but {len(y_all)} labels")
    n = len(y_all) if samples is None else min(samples, len(y_all))
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield x_all[start:stop].astype(np.float32), y_all[start:stop]


def _predictions(session: _Session, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Class predictions of one batch (in pieces of the session's static batch when it has one),
    and the number of classes scored."""
    static = session.static_batch()
    pieces = [x] if static is None else [x[i : i + static] for i in range(0, len(x), static)]
    out, classes = [], 0
    for piece in pieces:
        short = 0 if static is None else static - len(piece)
        if short:  # a static-batch model takes full batches only: pad, then drop the padding
            piece = np.concatenate([piece, np.zeros((short, *piece.shape[1:]), piece.dtype)])
        scores = session.run([piece])[0]
        if scores.ndim != 2:
            raise BnmoveError(
                f"accuracy needs class scores (batch x classes) as the first output; it has shape {scores.shape}"
            )
        classes = scores.shape[1]
        out.append(scores[: len(piece) - short].argmax(1))
    return np.concatenate(out), classes


def evaluate(
    sessions: Mapping[str, _Session], batches: Iterator[tuple[np.ndarray, np.ndarray]], reference: str
) -> list[Accuracy]:
    """Every variant's top-1 accuracy on the same batches, and its paired difference from ``reference``."""
    correct: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    for x, y in batches:
        for name, session in sessions.items():
            try:
                predicted, classes = _predictions(session, x)
            except BnmoveError:
                raise
            except Exception as exc:  # onnxruntime's own error: name the data and the variant
                shape = "x".join(map(str, x.shape[1:]))
                first = str(exc).splitlines()[0][:160]
                raise BnmoveError(
                    f"labelled data: {name} cannot run on inputs of shape {shape} ({first})"
                ) from exc
            if int(y.max(initial=0)) >= classes:
                raise BnmoveError(f"labelled data: label {int(y.max())} but {name} scores {classes} classes")
            correct[name].append(predicted == y)
    if not correct[reference]:
        raise BnmoveError("labelled data: no samples")
    hits = {name: np.concatenate(parts).astype(np.float64) for name, parts in correct.items()}
    n = len(hits[reference])
    by_sample = {name: dict(enumerate(h.tolist())) for name, h in hits.items()}
    results = []
    for name, h in hits.items():
        low, high = wilson_interval(int(h.sum()), n)
        if name == reference:
            results.append(Accuracy(name, n, int(h.sum()), low, high))
            continue
        paired = paired_difference(reference, name, by_sample)
        results.append(Accuracy(name, n, int(h.sum()), low, high, paired.mean, paired.low, paired.high))
    return results

"""How many threads bnmove's training loop uses on the CPU: measured, not inherited.

torch starts with one thread per core. On a machine whose cores are busy with other work, those
threads spin and wait for each other: a one-epoch digits study ran 7.9x slower beside one
CPU-bound process per core than on idle cores (a fair share would be 2x), and small models train
faster on one thread even on idle cores. So before training, the loop times a training step
(forward and backward on one batch) at one thread and at every core, interleaved so both see the
same load, and keeps every core only where that is clearly faster; ``threads=`` (``--threads``)
overrides.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.clone import clone_module
from .data import Dataset
from .runs import class_scores


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen, and the fastest step measured at each count tried."""

    threads: int
    #: thread count -> seconds of the fastest training step measured with it (empty when given)
    seconds: dict[int, float] = field(default_factory=dict)

    def describe(self) -> str:
        if not self.seconds:
            return f"{self.threads} threads, as given"
        if len(self.seconds) == 1:
            return "1 thread, the only core"
        measured = ", ".join(f"{n}: {s * 1000:.1f} ms" for n, s in sorted(self.seconds.items()))
        return f"{self.threads} of {max(self.seconds)} threads, the faster training step ({measured})"


def choose_threads(
    step: Callable[[], object],
    cores: int,
    *,
    repeats: int = 3,
    timer: Callable[[], float] = time.perf_counter,
) -> ThreadChoice:
    """Time ``step`` at one thread and at ``cores`` threads, ``repeats`` times each, interleaved
    (after one warm-up each); every core only where its best step is at least 10% faster than one
    thread's (within that, the difference is measurement noise, and one thread leaves the other
    cores to the machine)."""
    if cores <= 1:
        return ThreadChoice(1, {1: 0.0})  # nothing to measure against
    counts = (1, cores)
    best = dict.fromkeys(counts, float("inf"))
    with threads_set(torch.get_num_threads()):
        for count in counts:
            torch.set_num_threads(count)
            step()
        for _ in range(repeats):
            for count in counts:
                torch.set_num_threads(count)
                started = timer()
                step()
                best[count] = min(best[count], timer() - started)
    return ThreadChoice(cores if best[cores] < 0.9 * best[1] else 1, best)


@contextlib.contextmanager
def threads_set(count: int) -> Iterator[None]:
    """While open, torch uses ``count`` threads; the count before is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_step(model: nn.Module, data: Dataset, batch_size: int) -> Callable[[], object]:
    """One forward and backward of a copy of ``model`` on the first training batch: what the loop
    repeats, for :func:`choose_threads` to time."""
    probe = clone_module(model).train()
    first = data.train.batches(batch_size, torch.device("cpu"), train=False)
    x, y = next(iter(first(torch.arange(min(batch_size, len(data.train))))))

    def step() -> object:
        probe.zero_grad(set_to_none=True)
        loss = F.cross_entropy(class_scores(probe(x)).float(), y)
        loss.backward()
        return loss

    return step


__all__ = ["ThreadChoice", "choose_threads", "threads_set", "training_step"]

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

import torch
import torch.nn.functional as F
from torch import nn

from ..core.clone import clone_module
from ..core.threads import ThreadChoice, busy_cores, choose_count
from .data import Dataset
from .runs import class_scores


def choose_threads(
    step: Callable[[], object],
    cores: int,
    *,
    repeats: int = 5,
    timer: Callable[[], float] = time.perf_counter,
    busy: Callable[[], float | None] = busy_cores,
) -> ThreadChoice:
    """One thread on busy cores, else the faster of one thread and ``cores`` on ``step``, timed
    ``repeats`` times each, interleaved (`bnmove.core.threads.choose_count`)."""

    def at(count: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(count)
            return step()

        return run

    with threads_set(torch.get_num_threads()):
        return choose_count(at, cores, repeats=repeats, timer=timer, busy=busy)


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
    repeats, for `choose_threads` to time."""
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

"""How many CPU threads a measured loop uses: the faster of one thread and every core, measured.

A runtime starts one thread per core. On a machine whose cores are busy with other work those
threads spin and wait for each other, and small models run faster on one thread even on idle
cores. So bnmove's training loop (:mod:`bnmove.study.threads`) and ``compare`` on the CPU time a
step at one thread and at every core, interleaved so both see the same load, and keep every core
only where that is clearly faster.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

#: every core is kept only where its best step is at least this much faster than one thread's
#: (within that, the difference is measurement noise, and one thread leaves the cores to the machine)
MARGIN = 0.10


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen, and the fastest step measured at each count tried."""

    threads: int
    #: thread count -> seconds of the fastest step measured with it (empty when given)
    seconds: dict[int, float] = field(default_factory=dict)
    #: what was timed, for :meth:`describe`
    step: str = "training step"

    def describe(self) -> str:
        if not self.seconds:
            return f"{self.threads} thread{'' if self.threads == 1 else 's'}, as given"
        if len(self.seconds) == 1:
            return "1 thread, the only core"
        measured = ", ".join(f"{n}: {s * 1000:.2f} ms" for n, s in sorted(self.seconds.items()))
        return f"{self.threads} of {max(self.seconds)} threads, the faster {self.step} ({measured})"


def faster_count(
    runs: Mapping[int, Callable[[], object]],
    *,
    repeats: int = 3,
    timer: Callable[[], float] = time.perf_counter,
    step: str = "training step",
) -> ThreadChoice:
    """``runs``: thread count (1 and every core) -> one step at that count. Each runs once to warm
    up, then ``repeats`` times, interleaved; every core only where its best step is at least
    :data:`MARGIN` faster than one thread's."""
    counts = sorted(runs)
    if len(counts) == 1:
        return ThreadChoice(counts[0], {counts[0]: 0.0}, step)
    for count in counts:
        runs[count]()
    best = dict.fromkeys(counts, float("inf"))
    for _ in range(repeats):
        for count in counts:
            started = timer()
            runs[count]()
            best[count] = min(best[count], timer() - started)
    many = counts[-1]
    return ThreadChoice(many if best[many] < (1 - MARGIN) * best[counts[0]] else counts[0], best, step)


__all__ = ["MARGIN", "ThreadChoice", "available_cores", "faster_count"]

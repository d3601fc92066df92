"""How many CPU threads a measured loop uses: the faster of one thread and every core, measured.

A runtime starts one thread per core. On a machine whose cores are busy with other work those
threads spin and wait for each other, and small models run faster on one thread even on idle
cores. So bnmove's training loop (`bnmove.study.threads`) and ``compare`` on the CPU time a
step at one thread and at every core, interleaved so both see the same load, and keep every core
only where that is clearly faster.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: every core is kept only where its mean step is at least this much faster than one thread's
#: (within that, the difference is measurement noise, and one thread leaves the cores to the machine)
MARGIN = 0.10


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, as a container or ``taskset`` sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def busy_cores(window: float = 0.05) -> float | None:
    """How many cores other work kept busy over the next ``window`` seconds (this process sleeps
    meanwhile), read from ``/proc/stat``; None where there is no such file."""

    def ticks() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    before = ticks()
    time.sleep(window)
    after = ticks()
    if before is None or after is None or after[0] <= before[0]:
        return None
    total, idle = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * (total - idle) / total


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen, and the mean step measured at each count tried."""

    threads: int
    #: thread count -> mean seconds of the steps measured with it (empty when given)
    seconds: dict[int, float] = field(default_factory=dict)
    #: what was timed, for `describe`
    step: str = "training step"
    #: cores other work kept busy when one thread was chosen without timing (`busy_cores`)
    busy: float | None = None

    def describe(self) -> str:
        if self.busy is not None:
            return f"1 thread: {self.busy:.1f} of {os.cpu_count()} cores were busy with other work"
        if not self.seconds:
            return f"{self.threads} thread{'' if self.threads == 1 else 's'}, as given"
        if len(self.seconds) == 1:
            return "1 thread, the only core"
        measured = ", ".join(f"{n}: {s * 1000:.2f} ms" for n, s in sorted(self.seconds.items()))
        return f"{self.threads} of {max(self.seconds)} threads, the faster {self.step} (mean {measured})"


def faster_count(
    runs: Mapping[int, Callable[[], object]],
    *,
    repeats: int = 5,
    timer: Callable[[], float] = time.perf_counter,
    step: str = "training step",
) -> ThreadChoice:
    """``runs``: thread count (1 and every core) -> one step at that count. Each runs once to warm
    up, then up to ``repeats`` times, interleaved; every core only where its mean step is at least
    `MARGIN` faster than one thread's. The mean, not the best or the median: what a loop of
    steps costs is their sum, and beside other work the steps of threads that must all be
    scheduled at once are mostly fast and now and then very slow (two threads beside two
    CPU-bound processes: median 1.7 ms, as on idle cores, but single steps of 600 ms, and the
    study 2-10x slower than at one thread). Once a count has cost 3x the other over two rounds or
    more, the measuring stops: that much is no noise."""
    counts = sorted(runs)
    if len(counts) == 1:
        return ThreadChoice(counts[0], {counts[0]: 0.0}, step)
    for count in counts:
        runs[count]()
    spent: dict[int, list[float]] = {count: [] for count in counts}
    for round_ in range(repeats):
        for count in counts:
            started = timer()
            runs[count]()
            spent[count].append(timer() - started)
        totals = sorted(sum(times) for times in spent.values())
        if round_ >= 1 and totals[-1] > 3 * totals[0]:
            break
    mean = {count: statistics.fmean(times) for count, times in spent.items()}
    many = counts[-1]
    return ThreadChoice(many if mean[many] < (1 - MARGIN) * mean[counts[0]] else counts[0], mean, step)


def choose_count(
    runs: Callable[[int], Callable[[], object]],
    cores: int,
    *,
    step: str = "training step",
    busy: Callable[[], float | None] = busy_cores,
    **timing: Any,
) -> ThreadChoice:
    """One thread where other work keeps half a core or more busy (threads that must all be
    scheduled at once then wait for each other, and timing them costs as much as it tells), else
    the faster of one thread and ``cores`` by `faster_count`; ``runs(n)`` runs one step at
    ``n`` threads; ``busy``: how many cores other work keeps busy (`busy_cores`)."""
    if cores <= 1:
        return ThreadChoice(1, {1: 0.0}, step)
    others = busy()
    if others is not None and others >= 0.5:
        return ThreadChoice(1, {}, step, others)
    return faster_count({1: runs(1), cores: runs(cores)}, step=step, **timing)


__all__ = ["MARGIN", "ThreadChoice", "available_cores", "busy_cores", "choose_count", "faster_count"]

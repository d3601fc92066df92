"""Timing variants side by side: sessions per variant and batch size, interleaved rounds in
rotating order beside a noise floor (the reference's file in a second session), and the CPU's
thread count per batch size."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.threads import ThreadChoice, available_cores, choose_count
from .comparison import Timing
from .noise import RatioInterval, ratio_interval
from .sessions import Runner, SessionPlan

#: the timed name of the noise floor's session (never a variant's name: variants are file stems)
_FLOOR = "\0noise floor"


@dataclass(frozen=True)
class Rounds:
    """How each batch size is timed: untimed runs, then rounds (a count, or for so many seconds)."""

    warmup: int
    iterations: int | None
    seconds: float | None


@dataclass(frozen=True)
class Sessions:
    """The sessions the timings run in: the provider's, per variant and batch size."""

    named: dict[str, Path]
    ref: str
    provider: str
    checked: SessionPlan
    quantized: set[str]
    cache: Path
    #: the CPU's thread count per batch size (empty on a GPU provider)
    threads: dict[int, ThreadChoice]
    #: the reference's input specs (batch first)
    inputs: Sequence[Any]

    def plan_for(self, name: str, batch: int) -> SessionPlan:
        plan = timing_plan(
            self.provider, self.checked, self.inputs, batch, name in self.quantized, self.cache
        )
        return replace(plan, threads=self.threads[batch].threads) if batch in self.threads else plan

    def time(
        self, runners: dict[str, Runner], sizes: list[int], rounds: Rounds, step: Callable[[str], None]
    ) -> tuple[list[Timing], dict[int, RatioInterval]]:
        """Every variant at every batch size, in the same rounds, beside the noise floor: the
        reference's own file in a second session (byte-identical by definition, external weights
        included)."""
        ref = self.ref
        timings: list[Timing] = []
        floors: dict[int, RatioInterval] = {}
        order = [*runners, _FLOOR]
        timed: dict[str, Runner] = {}
        for batch in sizes:
            step(f"timing batch {batch}")
            if not timed or self.plan_for(ref, batch) != timed[ref].plan:  # (TensorRT: an
                timed.clear()  # engine per batch size; the CPU: this batch's threads), the last freed first
                for name in runners:
                    plan = self.plan_for(name, batch)
                    timed[name] = runners[name] if plan == self.checked else Runner(self.named[name], plan)
                timed[_FLOOR] = Runner(self.named[ref], self.plan_for(ref, batch))
            arrays = runners[ref].feeds(batch, seed=batch)
            for runner in timed.values():
                runner.bind(arrays)
                for _ in range(rounds.warmup):
                    runner.timed_run()
            samples = timed_rounds(timed, order, rounds.iterations, rounds.seconds)
            floors[batch] = ratio_interval(samples[_FLOOR], samples[ref], seed=batch)
            timings += [_timing(name, batch, samples[name], samples[ref]) for name in runners]
        timed.clear()
        return timings, floors

    def timed_with(self, batch: int) -> str:
        if self.provider == "tensorrt":
            return (
                "TensorRT, one engine per batch size: float32 (TF32 allowed, its default)"
                + (", INT8 for the quantized variants" if self.quantized else "")
                + f"; engines cached in {self.cache}"
            )
        return self.plan_for(self.ref, batch).describe()


def _timing(name: str, batch: int, seconds: Sequence[float], reference: Sequence[float]) -> Timing:
    """One variant's latency percentiles at one batch size, and its ratio to the reference timed in
    the same rounds, with the ratio's 95% interval."""
    ms = np.asarray(seconds) * 1000.0
    p50 = float(np.percentile(ms, 50))
    interval = ratio_interval(seconds, reference, seed=batch)
    return Timing(
        variant=name,
        batch_size=batch,
        runs=len(ms),
        mean_ms=float(ms.mean()),
        p50_ms=p50,
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        throughput=batch / (p50 / 1000.0),
        ratio=p50 / float(np.percentile(np.asarray(reference) * 1000.0, 50)),
        ratio_low=interval.low,
        ratio_high=interval.high,
    )


def timing_plan(
    provider: str, checked: SessionPlan, inputs: Sequence[Any], batch: int, int8: bool, cache: Path
) -> SessionPlan:
    """How one variant is timed at one batch size: on the CPU, in the session that checked its
    outputs; on CUDA, with the provider's defaults (TF32 allowed); on TensorRT, in an engine built
    for exactly this batch (``inputs``: the session's input specs, batch first), INT8 for QDQ files,
    cached in ``cache``."""
    if provider == "cpu":
        return checked
    if provider == "cuda":
        return SessionPlan("cuda", device_id=checked.device_id)
    shapes = tuple((i.name, (batch, *i.shape[1:])) for i in inputs)
    return SessionPlan("tensorrt", device_id=checked.device_id, cache_dir=cache, shapes=shapes, int8=int8)


def cpu_threads(
    path: Path, reference: Runner, sizes: Sequence[int], given: int | None
) -> dict[int, ThreadChoice]:
    """Per batch size, onnxruntime's intra-op threads for the CPU timings: ``given``, or one thread
    on busy cores, else the faster of one thread and every core on a few runs of the reference
    (`bnmove.core.threads.choose_count`)."""
    if given is not None:
        return dict.fromkeys(sizes, ThreadChoice(given))
    probes: dict[int, Runner] = {}

    def runs_at(batch: int) -> Callable[[int], Callable[[], object]]:
        arrays = reference.feeds(batch, seed=batch)

        def at(count: int) -> Callable[[], object]:
            if count not in probes:
                probes[count] = Runner(path, SessionPlan("cpu", threads=count))
            probes[count].bind(arrays)
            return probes[count].timed_run

        return at

    return {batch: choose_count(runs_at(batch), available_cores(), step="run") for batch in sizes}


def timed_rounds(
    timed: dict[str, Runner], order: list[str], iterations: int | None, seconds: float | None
) -> dict[str, list[float]]:
    """Seconds per run of each session, round by round, each round in a rotated order."""
    samples: dict[str, list[float]] = {n: [] for n in order}
    deadline = time.perf_counter() + seconds if seconds is not None else None
    rounds = 0
    while True:
        if iterations is not None and rounds >= iterations:
            break
        if deadline is not None and rounds >= 3 and time.perf_counter() >= deadline:
            break
        shift = rounds % len(order)
        for name in order[shift:] + order[:shift]:
            samples[name].append(timed[name].timed_run())
        rounds += 1
    return samples

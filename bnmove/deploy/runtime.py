"""Compare exported variants under onnxruntime: speed, output deviation, surviving nodes.

Variants are timed interleaved, round by round (and in rotating order), so
machine drift hits all of them alike. On CUDA and TensorRT inputs and outputs
are bound on the device (I/O binding), so timings measure inference rather
than host-device copies. Node counts are taken from the graph *after*
onnxruntime's optimisations, which shows which BatchNorms survived fusion.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.fidelity import difference
from ..core.progress import OnProgress, Stage, ignore
from ..core.threads import ThreadChoice, available_cores, choose_count
from ..errors import BnmoveError
from .accuracy import evaluate as evaluate_accuracy
from .accuracy import labelled_batches
from .comparison import Comparison, OutputDeviation, Timing, VariantInfo
from .noise import RatioInterval, ratio_interval
from .providers import _device_name, import_onnxruntime, select_provider
from .sessions import (
    Runner,
    SessionPlan,
    default_cache_dir,
    int8_execution,
    is_qdq,
    tensorrt_int8_problem,
)

if TYPE_CHECKING:  # onnx costs 0.7 s to import: only the commands that export load it
    pass

#: the timed name of the noise floor's session (never a variant's name: variants are file stems)
_FLOOR = "\0noise floor"


def collect_paths(items: Sequence[str | Path]) -> dict[str, Path]:
    """Variant name -> file, from files and folders (``<stem>.<variant>.onnx``)."""
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.onnx") if not p.name.startswith("."))
            if not found:
                raise BnmoveError(f"{path}: no .onnx files in this folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise BnmoveError(f"{path}: no such file or folder")
    named: dict[str, Path] = {}
    for path in files:
        stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
        parts = stem.split(".")
        # <stem>.<variant>.onnx -> variant; <stem>.<variant>.int8.onnx -> variant.int8
        name = ".".join(parts[-2:]) if len(parts) > 2 and parts[-1] == "int8" else parts[-1]
        if name in named:
            name = stem
        named[name] = path
    order = {"original": 0, "before": 1, "after": 2}
    return dict(
        sorted(
            named.items(), key=lambda kv: (kv[0].endswith(".int8"), order.get(kv[0].split(".")[0], 3), kv[0])
        )
    )


def _deviation(name: str, got: list[np.ndarray], want: list[np.ndarray]) -> OutputDeviation:
    measured = difference(want, got)
    return OutputDeviation(
        name, measured.max_abs, measured.mean_abs, measured.cosine, measured.top1, measured.rel
    )


def compare(
    paths: Sequence[str | Path] | Mapping[str, Path],
    *,
    provider: str = "auto",
    batch_sizes: Sequence[int] = (1, 8, 32),
    warmup: int = 5,
    iterations: int | None = 50,
    seconds: float | None = None,
    reference: str | None = None,
    on_progress: OnProgress | None = None,
    data: Any = None,
    data_samples: int | None = None,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
) -> Comparison:
    """Time and compare ONNX variants under onnxruntime.

    Args:
        paths: ``.onnx`` files or folders of them (as written by [`export_variants`][bnmove.export_variants]),
            or a ``{variant: path}`` mapping.
        provider: ``"auto"`` (TensorRT, then CUDA, then CPU: the first that works),
            or one of ``"tensorrt"``, ``"cuda"``, ``"cpu"``.
        batch_sizes: batch sizes to time (a model exported with a static batch is
            timed at its own batch only).
        warmup: untimed runs per variant and batch size (at least 1 on a GPU provider, whose
            first run sets up its kernels or builds its engine).
        iterations: timed rounds per batch size (each round runs every variant once).
        seconds: instead of ``iterations``, time rounds for this long per batch size.
        reference: the variant ratios and deviations refer to (default ``original``, else the first).
        on_progress: given a [`Stage`][bnmove.Stage] before each step ("loading after",
            "comparing outputs", "timing batch 8").
        data: labelled data to measure every variant's top-1 accuracy on: what ``--data``
            takes (``"digits"``, an ``.npz`` with ``x`` and ``y``, an image folder, a CIFAR
            folder; its validation split), a [`bnmove.study.Dataset`][bnmove.study.Dataset], or an ``(x, y)`` pair.
            Each variant's accuracy comes with a 95% interval and its paired difference from
            the reference on the same samples.
        data_samples: use at most this many labelled samples (default: all).
        cache_dir: TensorRT: where engines and timing caches are kept between runs (default
            ``$XDG_CACHE_HOME/bnmove/tensorrt``).
        threads: CPU: onnxruntime's intra-op threads for the timings (default: per batch size, the
            faster of one thread and every core, measured on the reference; see
            `bnmove.core.threads`). ``Comparison.threads`` says what was used.

    Timings use the provider's defaults (TF32 on CUDA and TensorRT). Output deviations, node
    counts and accuracy are measured in float32: on the CPU provider, or on CUDA with TF32 off for
    the GPU providers (`bnmove.deploy.sessions`). ``Comparison.timed_with`` and
    ``checked_with`` say which.

    Returns:
        A [`Comparison`][bnmove.Comparison] (``to_dict()`` for JSON; ``bnmove.report`` renders it).
    """
    named = dict(paths) if isinstance(paths, Mapping) else collect_paths(paths)
    _check_request(named, batch_sizes, iterations, seconds, data_samples, threads)
    import_onnxruntime()  # (its one-line error first, whatever the provider probes remember)
    chosen = select_provider(provider)
    ref = _reference(named, reference, chosen, warmup)
    report = on_progress or ignore

    def step(what: str) -> None:
        report(Stage(what))

    quantized = _quantized_variants(named, chosen)  # (TensorRT refuses what it cannot build, before work)
    batches = labelled_batches(data, data_samples) if data is not None else None
    checked = SessionPlan("cpu") if chosen == "cpu" else SessionPlan("cuda", tf32=False)
    with tempfile.TemporaryDirectory(prefix="bnmove-compare-") as tmp:
        runners: dict[str, Runner] = {}
        for name, path in named.items():
            step(f"loading {name}")
            runners[name] = Runner(path, checked, Path(tmp))
        sizes = _batch_sizes(runners, ref, batch_sizes)
        accuracies, deviations = _checks(runners, ref, batches, max(sizes), step)
        sessions = _Sessions(
            named,
            ref,
            chosen,
            checked,
            quantized,
            Path(cache_dir) if cache_dir is not None else default_cache_dir(),
            _cpu_threads(named[ref], runners[ref], sizes, threads) if chosen == "cpu" else {},
            runners[ref].inputs,
        )
        timings, floors = sessions.time(runners, sizes, _Rounds(warmup, iterations, seconds), step)
        variants = [
            VariantInfo(
                name,
                str(named[name]),
                named[name].stat().st_size,
                runners[name].optimized_nodes,
                int8_execution(chosen) if name in sessions.quantized else "float32",
            )
            for name in runners
        ]
    return Comparison(
        provider=chosen,
        device=_device_name(chosen),
        onnxruntime=import_onnxruntime().__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        reference=ref,
        variants=variants,
        timings=timings,
        deviations=deviations,
        batch_sizes=sizes,
        accuracies=accuracies,
        noise_floor=floors,
        timed_with=sessions.timed_with(sizes[0]),
        checked_with=checked.describe(),
        threads=sessions.threads,
    )


def _checks(
    runners: dict[str, Runner], ref: str, batches: Any, batch: int, step: Callable[[str], None]
) -> tuple[list[Any], list[OutputDeviation]]:
    """Every variant's accuracy on the labelled data (where given: before the timing, so bad data
    fails early) and its outputs against the reference's."""
    accuracies = []
    if batches is not None:
        step("accuracy on the labelled data")
        accuracies = evaluate_accuracy(runners, batches, ref)
    step("comparing outputs")
    arrays = runners[ref].feeds(batch, seed=0)
    want = runners[ref].run(arrays)
    return accuracies, [_deviation(name, r.run(arrays), want) for name, r in runners.items()]


def _reference(named: dict[str, Path], reference: str | None, chosen: str, warmup: int) -> str:
    """The variant the others are compared with, once the provider is known to be warmed up."""
    if chosen != "cpu" and warmup < 1:
        raise BnmoveError(
            f"warmup must be at least 1 on {chosen}: its first run sets up kernels (and builds "
            "TensorRT engines), which would be timed"
        )
    ref = reference or ("original" if "original" in named else next(iter(named)))
    if ref not in named:
        raise BnmoveError(f"reference variant {ref!r} is not among {', '.join(named)}")
    return ref


def _check_request(
    named: dict[str, Path],
    batch_sizes: Sequence[int],
    iterations: int | None,
    seconds: float | None,
    data_samples: int | None,
    threads: int | None,
) -> None:
    """One clear error for a request that cannot be timed, before anything loads."""
    if not named:
        raise BnmoveError("nothing to compare: no .onnx files given")
    if any(b <= 0 for b in batch_sizes) or not batch_sizes:
        raise BnmoveError("batch sizes must be positive integers")
    if (iterations is None) == (seconds is None):
        raise BnmoveError("give either iterations or seconds")
    if iterations is not None and iterations < 1:
        raise BnmoveError("iterations must be at least 1")
    if data_samples is not None and data_samples < 1:
        raise BnmoveError("data samples must be at least 1")
    if threads is not None and threads < 1:
        raise BnmoveError("threads must be at least 1")


@dataclass(frozen=True)
class _Rounds:
    """How each batch size is timed: untimed runs, then rounds (a count, or for so many seconds)."""

    warmup: int
    iterations: int | None
    seconds: float | None


@dataclass(frozen=True)
class _Sessions:
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
        self, runners: dict[str, Runner], sizes: list[int], rounds: _Rounds, step: Callable[[str], None]
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
            samples = _timed_rounds(timed, order, rounds.iterations, rounds.seconds)
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


def _batch_sizes(runners: dict[str, Runner], ref: str, asked: Sequence[int]) -> list[int]:
    """The batch sizes to time: those asked for, or the one a static-batch export fixes; one clear
    error for variants that take other inputs than the reference."""
    signature = [(i.shape[1:], i.type) for i in runners[ref].inputs]
    for name, runner in runners.items():
        if [(i.shape[1:], i.type) for i in runner.inputs] != signature:
            raise BnmoveError(f"variant {name} takes different inputs than {ref}")
    statics = {r.static_batch() for r in runners.values()}
    if statics == {None}:
        return list(asked)
    fixed = {s for s in statics if s is not None}
    if len(fixed) > 1 or None in statics:
        raise BnmoveError("variants mix static and dynamic or different static batch sizes")
    return [fixed.pop()]


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


def _cpu_threads(
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


def _timed_rounds(
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


def _quantized_variants(named: dict[str, Path], provider: str) -> set[str]:
    """The QDQ (INT8) variants; on TensorRT, one clear error for any it cannot build, before work."""
    import onnx

    quantized = set()
    for name, path in named.items():
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise BnmoveError(f"{path}: not an ONNX file onnx can read ({type(exc).__name__})") from exc
        if not is_qdq(model):
            continue
        quantized.add(name)
        problem = tensorrt_int8_problem(model) if provider == "tensorrt" else None
        if problem:
            raise BnmoveError(
                f"{name}: TensorRT cannot build this INT8 file: {problem}; export it with "
                "--quantize int8-tensorrt, or compare it on --provider cuda or cpu"
            )
    return quantized

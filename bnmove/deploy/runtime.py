"""Compare exported variants under onnxruntime: speed, output deviation, surviving nodes.

Variants are timed interleaved, round by round (and in rotating order), so
machine drift hits all of them alike. On CUDA and TensorRT inputs and outputs
are bound on the device (I/O binding), so timings measure inference rather
than host-device copies. Node counts are taken from the graph *after*
onnxruntime's optimisations, which shows which BatchNorms survived fusion.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..core.fidelity import difference
from ..core.progress import OnProgress, Stage, ignore
from ..errors import BnmoveError
from .accuracy import evaluate as evaluate_accuracy
from .accuracy import labelled_batches
from .comparison import Comparison, OutputDeviation, VariantInfo
from .providers import _device_name, import_onnxruntime, select_provider
from .rounds import Rounds, Sessions, cpu_threads
from .sessions import (
    Runner,
    SessionPlan,
    default_cache_dir,
    int8_execution,
    is_qdq,
    tensorrt_int8_problem,
)


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
        sessions = Sessions(
            named,
            ref,
            chosen,
            checked,
            quantized,
            Path(cache_dir) if cache_dir is not None else default_cache_dir(),
            cpu_threads(named[ref], runners[ref], sizes, threads) if chosen == "cpu" else {},
            runners[ref].inputs,
        )
        timings, floors = sessions.time(runners, sizes, Rounds(warmup, iterations, seconds), step)
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

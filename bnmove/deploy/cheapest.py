"""``fold="auto"``: every exact form of a variant measured on onnxruntime's CPU provider; the fastest kept.

The forms are the variant as converted (``none``: onnxruntime fuses a BN into the Conv before it,
nothing else), with BNs folded forward (``forward``: into the next layers, through pooling, into a
squeeze-and-excitation gate), and with border-corrected folds into zero-padded convs too
(``padded``). Each removes BNs at a price: a border-corrected conv adds a constant map, a gate fold
a per-sample bias. Which form is cheapest depends on the model and the runtime, so it is measured:
the forms that differ (their INT8 files, when the export quantizes) are timed interleaved (one run
of each per round, so a noisy machine slows them alike) at the example input's batch, beside a
second session of the first form (the noise floor, as ``compare`` times it), and the one with the
lowest median is kept. Medians within 3% tie, or within the floor's spread when the machine is
noisier than that, and a tie goes to the form that leaves fewer standalone BNs; when the floor is
as wide as every difference, the manifest says the machine was too noisy to separate them. Every form
computes the same function; the manifest records each form's median, its standalone BNs and why
the chosen one won.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .folding import Folding, fold_forward
from .noise import RatioInterval, ratio_interval, too_noisy

#: the forms ``auto`` chooses between, cheapest to make first
FORMS = ("none", "forward", "padded")


@dataclass(frozen=True)
class FormTiming:
    """One form's median latency and the BNs it leaves; its ratio to the first form timed, with the
    ratio's 95% interval over the rounds."""

    form: str
    p50_ms: float
    standalone_bns: int
    ratio: float = 1.0
    ratio_low: float = 1.0
    ratio_high: float = 1.0


def distinct_forms(foldings: dict[str, Folding | None]) -> list[str]:
    """The forms whose folds differ (``padded`` folds nothing more than ``forward`` on many models)."""
    kept: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    for form in FORMS:
        folding = foldings[form]
        key = tuple((b.bn, b.fate, b.form) for b in folding.bns) if folding is not None else ("none",)
        if key not in seen:
            seen.add(key)
            kept.append(form)
    return kept


def time_forms(
    paths: dict[str, Path], tmp: Path, rounds: int = 30, warmup: int = 3
) -> tuple[dict[str, list[float]], list[float]]:
    """Seconds per run of each file on onnxruntime's CPU provider, round by round (interleaved, in
    rotating order), and of a second session of the first file in the same rounds: the noise
    floor, what two identical graphs read here and now (`bnmove.deploy.noise`)."""
    from .rounds import timed_rounds
    from .sessions import Runner, SessionPlan

    floor = "\0noise floor"
    runners = {form: Runner(path, SessionPlan("cpu"), tmp) for form, path in paths.items()}
    runners[floor] = Runner(next(iter(paths.values())), SessionPlan("cpu"))
    first = next(iter(runners.values()))
    arrays = first.feeds(first.static_batch() or 1, seed=0)
    for runner in runners.values():  # the same input for every form
        runner.bind(arrays)
        for _ in range(warmup):
            runner.timed_run()
    samples = timed_rounds(runners, list(runners), rounds, None)
    return {form: samples[form] for form in paths}, samples[floor]


def cheapest_form(
    model: nn.Module,
    path: Path,
    write: Callable[[nn.Module, Path], float],
    quantize: Callable[[Path, Path], object] | None = None,
) -> tuple[float, dict[str, Any]]:
    """Export every exact form of ``model`` that differs (``write`` exports one and checks it against
    PyTorch, returning its error), time them, and keep the fastest at ``path``. With ``quantize``
    (float file -> INT8 file) the INT8 forms are what is timed and counted: the INT8 file is what
    ships, and a BN no fold removes stays float in it. Returns the kept form's error and what the
    manifest records."""
    import onnx

    foldings: dict[str, Folding | None] = {
        "none": None,
        "forward": fold_forward(model),
        "padded": fold_forward(model, padded=True),
    }
    forms = distinct_forms(foldings)
    paths, errors, bns = {}, {}, {}
    for form in forms:
        folding = foldings[form]
        candidate = path.with_name(f"{path.stem}.{form}.onnx")
        errors[form] = write(model if folding is None else folding.model, candidate)
        proto = onnx.load(str(candidate), load_external_data=False)
        bns[form] = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
        paths[form] = candidate
    timed = paths
    if quantize is not None and len(forms) > 1:
        timed = {form: paths[form].with_name(f"{path.stem}.{form}.int8.onnx") for form in forms}
        for form in forms:
            quantize(paths[form], timed[form])
            proto = onnx.load(str(timed[form]), load_external_data=False)
            bns[form] = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    timings, floor = _timed_forms(forms, timed, bns, path.parent)
    form, why = choose(timings, floor)
    os.replace(paths[form], path)
    for other in (*paths.values(), *(timed.values() if timed is not paths else ())):
        other.unlink(missing_ok=True)
    chosen = foldings[form]
    entry = {
        "fold_auto": {
            "form": form,
            "reason": why,
            "timed": "int8" if timed is not paths else "float",
            "forms": [asdict(t) for t in timings],
            **({"noise_floor": asdict(floor), "too_noisy": _too_noisy(timings, floor)} if floor else {}),
        },
        **(chosen.manifest() if chosen is not None else {}),
    }
    return errors[form], entry


def _timed_forms(
    forms: list[str], files: dict[str, Path], bns: dict[str, int], folder: Path
) -> tuple[list[FormTiming], RatioInterval | None]:
    """Each form's timing against the first, and the noise floor beside them (none for one form)."""
    if len(forms) == 1:
        return [FormTiming(forms[0], 0.0, bns[forms[0]])], None
    samples, floor_samples = time_forms(files, folder)
    timings = []
    for form in forms:
        interval = ratio_interval(samples[form], samples[forms[0]])
        p50 = statistics.median(samples[form]) * 1e3
        timings.append(FormTiming(form, p50, bns[form], interval.ratio, interval.low, interval.high))
    return timings, ratio_interval(floor_samples, samples[forms[0]])


#: medians closer than this to the fastest always count as a tie (the noise of a few dozen runs)
TIE = 0.03


def _too_noisy(timings: list[FormTiming], floor: RatioInterval) -> bool:
    return too_noisy(floor, [RatioInterval(t.ratio, t.ratio_low, t.ratio_high) for t in timings[1:]])


def choose(timings: list[FormTiming], floor: RatioInterval | None = None) -> tuple[str, str]:
    """The fastest form and the reason, in words. Forms within `TIE` of the fastest tie, or
    within the noise floor's spread when that is wider (a difference smaller than two identical
    graphs show is none), and a tie goes to the form that leaves fewer standalone BNs (it quantizes
    more cleanly), then to the simpler form."""
    margin = TIE
    if floor is not None:
        margin = max(TIE, floor.high - 1.0, 1.0 - floor.low)
    fastest = min(t.p50_ms for t in timings)
    tied = [t for t in timings if t.p50_ms <= fastest * (1 + margin)]
    best = min(tied, key=lambda t: (t.standalone_bns, FORMS.index(t.form)))
    if len(timings) == 1:
        return best.form, "the only form: the folds change nothing in this variant"
    others = ", ".join(
        f"{t.form} {t.p50_ms:.3f} ms" for t in sorted(timings, key=lambda t: t.p50_ms) if t is not best
    )
    why = f"{best.p50_ms:.3f} ms (p50 on onnxruntime CPU) against {others}"
    if floor is not None and _too_noisy(timings, floor):
        return best.form, (
            f"{why}: the machine was too noisy to separate the forms (one graph timed twice read "
            f"{floor.low:.2f}–{floor.high:.2f}× of itself), kept for leaving the fewest standalone BNs"
        )
    if len(tied) > 1:
        return best.form, f"{why}: within {margin:.0%}, a tie, kept for leaving the fewest standalone BNs"
    return best.form, f"fastest: {why}"


__all__ = ["FORMS", "FormTiming", "cheapest_form", "choose", "distinct_forms", "time_forms"]

"""``convert``: move every movable BatchNorm to one side of its activation.

The stages, each a function of what the one before returned: *analyse* a copy
(`analyse`: the analysis graph, the sites, each movable pair's
structure) -> *plan* (`plan`: a frozen decision per site) -> *apply*
(`apply`: parameters, then module surgery or a regenerated forward) ->
*calibrate* (`calibration`: fits made again on data) -> *verify*
(`bnmove.core.fidelity`) against the original in eval mode. The copy is
returned: the user's class, attributes, hooks and forward code, with only the
moved modules changed. The input model is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..analysis.detect import PLACEMENTS, has_uninitialized_lazy
from ..analysis.inputs import infer_example_inputs
from ..core.clone import clone_module
from ..core.fidelity import Deviation, compare_models, tolerance_for
from ..core.gc_pause import paused_gc
from ..core.progress import OnProgress, Stage
from ..core.running import double_inputs
from ..errors import BnmoveError, VerificationError
from ..fitting.calibrate import Batch, calibration_batches, split_held_out
from ..io.pretrained import is_pretrained_model
from ..rules import FIT
from ..rules.base import CalibrationSource
from .analyse import Analysis, analyse
from .apply import apply
from .calibration import Calibration, Calibrator, Pending, SyntheticRequest, calibration_check
from .plan import METHODS, Decision, check_choice, plan
from .results import Conversion, Move, Progress, silent

log = logging.getLogger(__name__)


def _stages(on_progress: OnProgress) -> Progress:
    """The stages' ``(what, done, total)`` calls as the [`Stage`][bnmove.Stage] events callers get."""
    return lambda what, done, total: on_progress(Stage(what, done, total))


def convert(
    model: nn.Module,
    placement: str,
    *,
    method: str = "auto",
    example_inputs: Sequence[torch.Tensor] | None = None,
    calibration: Calibration | None = None,
    verify: bool = True,
    on_progress: OnProgress | None = None,
    max_error: float | None = None,
) -> Conversion:
    """Move every movable BatchNorm ``placement`` (``"before"``/``"after"``) its activation.

    Args:
        model: the model to convert; it is copied, never modified.
        placement: ``"before"`` (BN -> f) or ``"after"`` (f -> BN).
        method: ``"exact"`` keeps eval outputs: the BN is folded into the
            neighbouring Conv/Linear, or where none absorbs it its eval-mode
            affine map is kept as a [`ChannelAffine`][bnmove.core.affine.ChannelAffine]
            layer; an identity BN with real statistics goes to the other side.
            Only a BN without running statistics has no exact move.
            ``"fit"`` moves every pair and fits the new BN so the block
            reproduces the old one, with no extra layer; ``"swap"`` reorders
            and leaves parameters untouched; ``"auto"`` is exact where possible
            and fit elsewhere (swap only where fitting is impossible).
        example_inputs: inputs for the verification run; inferred from the
            first layer when not given.
        calibration: where fits get their samples ([`Calibration`][bnmove.Calibration]: your
            data, or data-free from Gaussian or synthetic inputs); Gaussian
            data-free fits when not given.
        verify: compare original and converted outputs in eval mode.
        on_progress: given a [`Stage`][bnmove.Stage] as the conversion goes through its
            stages: analysing, making synthetic inputs, moving pairs, calibrating, verifying
            (``total`` is None where there is nothing to count).
        max_error: when the conversion changes the function (fit, swap), raise
            [`BnmoveError`][bnmove.BnmoveError] if its relative output error exceeds this: on
            the held-out calibration samples when there are any, else on the
            verification inputs. Without it a large change adds a line to
            ``Conversion.warnings`` that names the pairs that changed it most.

    Returns:
        A [`Conversion`][bnmove.Conversion]; with ``method="exact"`` a deviation above float
        tolerance raises [`VerificationError`][bnmove.VerificationError] instead.

    Example:
        >>> result = convert(model, "after", method="exact")
        >>> result.verification.max_abs_error   # ~1e-6
        >>> fitted = convert(model, "after", method="fit", calibration=Calibration(x))
    """
    progress = _stages(on_progress) if on_progress is not None else silent
    with paused_gc():
        result = _convert(
            model, placement, method, example_inputs, verify, calibration or Calibration(), progress
        )
    _judge_fidelity(result, max_error)
    return result


#: above this relative output error (or below this top-1 agreement) a changed function is warned about
WARN_REL_ERROR = 0.05
WARN_TOP1 = 0.99


def _judge_fidelity(result: Conversion, max_error: float | None) -> None:
    """Refuse (``max_error``) or warn about a conversion whose outputs moved, on the most honest data."""
    changed = result.changed_function
    if not changed:
        return
    check = result.held_out
    if check is not None:
        where, rel, top1 = (
            f"{check.samples} held-out calibration samples",
            check.max_rel_error,
            check.top1_agreement,
        )
    elif result.verification is not None:
        shapes = ", ".join("x".join(map(str, s)) for s in result.verification.input_shapes)
        where, rel, top1 = f"the example input {shapes}", result.verification.max_rel_error, None
    else:
        return
    worst = sorted(changed, key=lambda m: -(m.effect if m.effect is not None else float("inf")))[:3]
    names = ", ".join(
        f"{m.pair.bn} ({m.method}" + (f", block error {m.effect:.2f})" if m.effect is not None else ")")
        for m in worst
    )
    agree = f", top-1 agreement {top1:.1%}" if top1 is not None else ""
    if max_error is not None and rel > max_error:
        raise BnmoveError(
            f"the conversion changes outputs by {rel:.3g} relative on {where}{agree}, above --max-error "
            f"{max_error:g}; the pairs that changed them most: {names}"
        )
    if max_error is None and (rel > WARN_REL_ERROR or (top1 is not None and top1 < WARN_TOP1)):
        message = (
            f"the converted model computes something else: relative output error {rel:.3g} on {where}"
            f"{agree}; the pairs that changed it most: {names}"
        )
        result.warnings.append(message)  # the CLI prints these; API users read them here
        log.info(message)


def _convert(
    model: nn.Module,
    placement: str,
    method: str,
    example_inputs: Sequence[torch.Tensor] | None,
    verify: bool,
    calibration: Calibration,
    progress: Progress = silent,
) -> Conversion:
    batches = None
    if calibration.data is not None:
        batches = calibration_batches(calibration.data, samples=calibration.samples)
    synthetic = SyntheticRequest(calibration.samples) if calibration.data_free == "synthetic" else None
    refit_next = calibration.refit_next
    if has_uninitialized_lazy(model):
        raise BnmoveError("the model has lazy layers that are not initialised; run one forward pass first")
    check_choice("placement", placement, PLACEMENTS)
    check_choice("method", method, METHODS)
    progress("analysing the model", 0, None)
    work = clone_module(model)
    analysis = analyse(work, example_inputs)
    decisions = plan(analysis, placement, method)
    inputs = _verification_inputs(model, analysis, example_inputs, verify)
    data = _calibration_data(model, analysis, decisions, batches, synthetic, inputs, refit_next, progress)
    pending, dispatched = apply(analysis, decisions, method, data.calibrator, progress)
    moves = _calibrate(model, work, pending, data, progress)
    deviation = None
    if verify and inputs is not None:
        progress("verifying", 0, None)
        deviation = _verify(model, work, moves, inputs, placement, method)
    # Agreement on synthetic inputs says little about real data (they sit near decision
    # boundaries), so only the user's own calibration data is checked end to end.
    real = data.batches if data.source == "calibrated" else None
    check = calibration_check(model, work, real) if real else None
    held_check = calibration_check(model, work, data.held) if real and data.held else None
    log.info("moved %d of %d pairs", sum(m.moved for m in moves), len(moves))
    warnings = [needs_bnmove(work, dispatched)] if dispatched else []
    if any(m.moved or m.absorbed for m in moves) and is_pretrained_model(work):
        warnings.append(SAVE_PRETRAINED)
    return Conversion(
        work, placement, method, moves, deviation, analysis.traced.untraced, check, held_check, warnings
    )


#: what a converted Hugging Face model's own save_pretrained folder gives back (issue 31)
SAVE_PRETRAINED = (
    "this model's own save_pretrained writes its weights and config, from which from_pretrained "
    "builds the original placement, so it would load them with the moved BNs missing (newly "
    "initialised): write the folder with bnmove.io.save_pretrained(model, folder) (bnmove convert "
    "--format hf), which from_pretrained(folder, trust_remote_code=True) loads converted, or save "
    "the model whole (torch.save), or --format pt2"
)


def needs_bnmove(work: nn.Module, scopes: list[str]) -> str:
    """The one line that says which regenerated forwards tie a saved model to bnmove, and why."""
    named = ", ".join(
        f"{scope or 'the model'} ({type(work.get_submodule(scope)).__name__})" for scope in scopes[:3]
    )
    more = f" and {len(scopes) - 3} more" if len(scopes) > 3 else ""
    return (
        f"the forward of {named}{more} branches on the mode or on an optional argument and takes "
        "*args or **kwargs, so bnmove regenerated it as one graph per branch with a dispatch that "
        "torch alone cannot rebuild: the model saved whole needs bnmove installed to load; "
        "--format pt2 (a torch.export program) and --code-dir (plain Python) do not"
    )


def _verification_inputs(
    model: nn.Module, analysis: Analysis, example_inputs: Sequence[Any] | None, verify: bool
) -> tuple[Any, ...] | None:
    if example_inputs is not None:
        return tuple(example_inputs)
    if not verify:
        return None
    return infer_example_inputs(model, analysis.traced_whole)


@dataclass
class _CalibrationData:
    """The samples fits are made on (the user's, or synthetic), those held out, and who plans the passes."""

    batches: list[Batch] | None
    held: list[Batch]
    source: CalibrationSource
    calibrator: Calibrator | None


def _calibration_data(
    model: nn.Module,
    analysis: Analysis,
    decisions: list[Decision],
    batches: list[Batch] | None,
    synthetic: SyntheticRequest | None,
    inputs: tuple[Any, ...] | None,
    refit_next: bool,
    progress: Progress,
) -> _CalibrationData:
    source: CalibrationSource = "calibrated"
    if synthetic is not None and any(d.rule in FIT.values() for d in decisions):
        if analysis.traced_whole is not None:
            batches, source = synthetic.batches(model, inputs, progress), "synthetic"
        else:
            log.warning("synthetic fitting needs a model that traces whole; fitting from Gaussian statistics")
    held: list[Batch] = []
    if batches is not None and source != "synthetic":
        batches, held = split_held_out(batches)
    calibrator = Calibrator(analysis.traced.regions, refit_next, source) if batches is not None else None
    return _CalibrationData(batches, held, source, calibrator)


def _calibrate(
    model: nn.Module,
    converted: nn.Module,
    pending: list[Pending],
    data: _CalibrationData,
    progress: Progress,
) -> list[Move]:
    """Stage 4: the fits made again on the calibration data, in two passes."""
    calibrator = data.calibrator
    if calibrator is None or data.batches is None:
        return [p.move for p in pending]
    plans = [p.plan for p in pending if p.plan is not None]
    fits = iter(
        calibrator.run(
            model, converted, plans, data.batches, progress if data.source != "synthetic" else silent
        )
    )
    return [calibrator.finish(p, next(fits)) if p.plan is not None else p.move for p in pending]


def _verify(
    model: nn.Module,
    converted: nn.Module,
    moves: list[Move],
    inputs: tuple[Any, ...],
    placement: str,
    method: str,
) -> Deviation:
    """Stage 5: the converted model beside the original; an exact conversion that moved outputs raises."""
    deviation = compare_models(model, converted, inputs)
    claimed_exact = all(m.keeps_outputs for m in moves)
    if (
        claimed_exact
        and not deviation.within_tolerance
        and deviation.tolerance > tolerance_for(torch.float64)
    ):
        # Some deep random nets amplify float32 rounding past any fixed tolerance. The same
        # conversion made on a float64 copy agrees to ~1e-11 when it is exact; a wrong one does not.
        high = clone_module(model).double()
        wide = double_inputs(inputs)
        again = _convert(high, placement, method, wide, False, Calibration())
        deviation = replace(
            deviation, float64_rel_error=compare_models(high, again.model, wide).max_rel_error
        )
    if claimed_exact and not deviation.within_tolerance:
        in_float64 = (
            f"; {deviation.float64_rel_error:.3g} in float64"
            if deviation.float64_rel_error is not None
            else ""
        )
        raise VerificationError(
            f"exact conversion changed outputs: max abs error {deviation.max_abs_error:.3g} "
            f"(relative {deviation.max_rel_error:.3g} > {deviation.tolerance:g}{in_float64}); "
            "please report this model"
        )
    return deviation

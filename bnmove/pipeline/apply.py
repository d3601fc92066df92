"""Stage 3, *apply*: each decision carried out, parameters first, then the structure that holds it."""

from __future__ import annotations

from ..fitting.sequential import PairPlan
from ..moving import parameters
from ..moving.absorb import absorb
from .analyse import Analysis
from .calibration import NOT_CALIBRATED, Calibrator
from .plan import Decision
from .results import Move, Progress, silent


def apply(
    analysis: Analysis,
    decisions: list[Decision],
    method: str,
    calibrator: Calibrator | None,
    progress: Progress = silent,
) -> list[tuple[Move, PairPlan | None]]:
    """Make every decided move on ``analysis.model``; each move with the calibration plan of its fit."""
    pending: list[tuple[Move, PairPlan | None]] = []
    total = sum(d.rule is not None for d in decisions)
    done = 0
    for decision in decisions:
        if decision.rule is None:
            pending.append((Move(decision.site.pair, False, None, decision.reason), None))
            continue
        progress("moving pairs", done, total)
        done += 1
        if decision.rule == "absorb":
            pending.append(_absorb(analysis, decision, calibrator))
        else:
            pending.append(_move(analysis, decision, method, calibrator))
    progress("moving pairs", done, total)
    analysis.mover.install()
    return pending


def _move(
    analysis: Analysis, decision: Decision, method: str, calibrator: Calibrator | None
) -> tuple[Move, PairPlan | None]:
    site, mover = decision.site, analysis.mover
    assert decision.rule in ("exact", "fit", "swap")
    structure = analysis.structure(site)
    assert structure is not None  # a movable pair has one (analyse)
    root = analysis.traced.regions[site.region].root
    # A fit starts from Gaussian statistics; with data, the calibration passes fit it again.
    plan = calibrator.plan(site) if calibrator and decision.rule == "fit" else None
    used, notes, effect, affine = parameters.adjust(root, site, decision.rule, None)
    more, moved_to = mover.apply(site, structure, affine)
    notes.extend(more)
    if plan is not None and calibrator is not None and used == "fit-data-free" and moved_to is not None:
        plan.bn = moved_to
        calibrator.plan_refit(plan, site, mover.modules(site.region))
    else:
        if calibrator is not None and used == "fit-data-free":
            notes.append(NOT_CALIBRATED)
        plan = None
    why = site.pair.reason if used != "exact" and method in ("auto", "exact") else None
    return Move(site.pair, True, used, why, tuple(notes), effect, moved_to), plan


def _absorb(
    analysis: Analysis, decision: Decision, calibrator: Calibrator | None
) -> tuple[Move, PairPlan | None]:
    """A kept affine next to the pair, from an earlier exact move: fit it into the pair's BN."""
    site, kept, mover = decision.site, decision.kept, analysis.mover
    assert kept is not None
    plan = calibrator.plan_absorb(site, kept) if calibrator else None
    try:
        said, error = absorb(analysis.traced.regions[site.region].root, site, kept)
    except parameters.CannotFit as refused:
        return Move(site.pair, False, None, f"{decision.reason}; kept affine stays: {refused}"), None
    mover.forget(site.region)
    if plan is not None and calibrator is not None:
        # the block now ends at BN″ (A → f → BN′) or where A was (BN′ → f → A)
        end = site.bn_node if kept.side == "before" else kept.node
        calibrator.plan_refit(plan, site, mover.modules(site.region), out=end)
    elif calibrator is not None:
        said.append(NOT_CALIBRATED)
    move = Move(site.pair, False, "fit-data-free", decision.reason, tuple(said), error, absorbed=kept.name)
    return move, plan

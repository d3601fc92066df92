"""Stage 3, *apply*: each decision carried out, its rule's parameters first, then the structure that holds it."""

from __future__ import annotations

from torch import nn

from ..analysis.detect import Site
from ..analysis.patterns import is_frozen_batchnorm
from ..fitting.sequential import PairPlan
from ..rules import ABSORB, Method, Rule
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
) -> tuple[list[tuple[Move, PairPlan | None]], list[str]]:
    """Make every decided move on ``analysis.model``: each move with the calibration plan of its
    fit, and the modules whose regenerated forward needs bnmove to load."""
    pending: list[tuple[Move, PairPlan | None]] = []
    total = sum(d.rule is not None for d in decisions)
    done = 0
    for decision in decisions:
        if decision.rule is None:
            pending.append((Move(decision.site.pair, False, None, decision.reason), None))
            continue
        progress("moving pairs", done, total)
        done += 1
        if decision.rule is ABSORB:
            pending.append(_absorb(analysis, decision, calibrator))
        else:
            pending.append(_move(analysis, decision, method, calibrator))
    progress("moving pairs", done, total)
    return pending, analysis.mover.install()


def _frozen_note(root: nn.Module, site: Site, rule: Rule) -> list[str]:
    if site.bn_node.op != "call_module" or not is_frozen_batchnorm(
        root.get_submodule(str(site.bn_node.target))
    ):
        return []
    if rule.exact:
        return [
            "frozen BN: it never normalises, so the move folds its affine away and leaves it as the "
            "identity on the other side (it stays frozen)"
        ]
    return ["frozen BN: it keeps a fixed affine map on the other side and never normalises"]


def _move(
    analysis: Analysis, decision: Decision, method: str, calibrator: Calibrator | None
) -> tuple[Move, PairPlan | None]:
    site, mover, rule = decision.site, analysis.mover, decision.rule
    assert rule is not None
    structure = analysis.structure(site)
    assert structure is not None  # a movable pair has one (analyse)
    root = analysis.traced.regions[site.region].root
    # A fit starts from Gaussian statistics; with data, the calibration passes fit it again.
    plan = calibrator.plan(site) if calibrator and rule.fits else None
    applied = rule.apply(root, site, decision.check)
    notes = [decision.note] if decision.note else []
    notes += applied.notes + _frozen_note(root, site, rule)
    more, moved_to = mover.apply(site, structure, applied.kept)
    notes.extend(more)
    if plan is not None and calibrator is not None and moved_to is not None:
        plan.bn = moved_to
        calibrator.plan_refit(plan, site, mover.modules(site.region))
    else:
        if calibrator is not None and rule.fits:
            notes.append(NOT_CALIBRATED)
        plan = None
    why = site.pair.reason if rule.method is not Method.EXACT and method in ("auto", "exact") else None
    move = Move(site.pair, True, rule.method, why, tuple(notes), applied.error, moved_to, rule=rule.name)
    return move, plan


def _absorb(
    analysis: Analysis, decision: Decision, calibrator: Calibrator | None
) -> tuple[Move, PairPlan | None]:
    """A kept affine next to the pair, from an earlier exact move: fit it into the pair's BN."""
    site, kept, mover = decision.site, decision.check.kept, analysis.mover
    assert kept is not None
    plan = calibrator.plan_absorb(site, kept) if calibrator else None
    applied = ABSORB.apply(analysis.traced.regions[site.region].root, site, decision.check)
    mover.forget(site.region)
    notes = applied.notes
    if plan is not None and calibrator is not None:
        # the block now ends at BN″ (A → f → BN′) or where A was (BN′ → f → A)
        end = site.bn_node if kept.side == "before" else kept.node
        calibrator.plan_refit(plan, site, mover.modules(site.region), out=end)
    elif calibrator is not None:
        notes.append(NOT_CALIBRATED)
    move = Move(
        site.pair,
        False,
        ABSORB.method,
        decision.reason,
        tuple(notes),
        applied.error,
        absorbed=kept.name,
        rule=ABSORB.name,
    )
    return move, plan

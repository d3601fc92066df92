"""Stage 3, *apply*: each decision carried out, its rule's parameters first, then the structure that holds it."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..analysis.batchnorms import is_frozen_batchnorm
from ..analysis.detect import Site
from ..core.modules import qualified, submodule
from ..rules import ABSORB, Method, Rule, solve_primes
from .analyse import Analysis
from .calibration import NOT_CALIBRATED, Calibrator, Pending
from .plan import Decision
from .results import Move, Progress, silent


def apply(
    analysis: Analysis,
    decisions: list[Decision],
    method: str,
    calibrator: Calibrator | None,
    progress: Progress = silent,
) -> tuple[list[Pending], list[str]]:
    """Make every decided move on ``analysis.model``: each move with the calibration plan of its
    fit, and the modules whose regenerated forward needs bnmove to load."""
    pending: list[Pending] = []
    total = sum(d.rule is not None for d in decisions)
    done = 0
    primes = solve_primes(
        [(_root(analysis, d.site), d.site, d.rule) for d in decisions if d.rule is not None]
    )
    for decision in decisions:
        if decision.rule is None:
            pending.append(Pending(Move(decision.site.pair, False, None, decision.reason)))
            continue
        progress("moving pairs", done, total)
        done += 1
        if decision.rule is ABSORB:
            pending.append(_absorb(analysis, decision, calibrator))
        else:
            check = replace(decision.check, prime=primes.get(decision.site))
            pending.append(_move(analysis, replace(decision, check=check), method, calibrator))
    progress("moving pairs", done, total)
    return pending, analysis.mover.install()


def _root(analysis: Analysis, site: Site) -> nn.Module:
    return analysis.traced.regions[site.region].root


def _frozen_note(root: nn.Module, site: Site, rule: Rule) -> list[str]:
    if site.bn_node.op != "call_module" or not is_frozen_batchnorm(submodule(root, str(site.bn_node.target))):
        return []
    if rule.exact:
        return [
            "frozen BN: it never normalises, so the move folds its affine away and leaves it as the "
            "identity on the other side (it stays frozen)"
        ]
    return ["frozen BN: it keeps a fixed affine map on the other side and never normalises"]


def _move(analysis: Analysis, decision: Decision, method: str, calibrator: Calibrator | None) -> Pending:
    site, mover, rule = decision.site, analysis.mover, decision.rule
    assert rule is not None
    structure = analysis.structure(site)
    assert structure is not None  # a movable pair has one (analyse)
    root = _root(analysis, site)
    # A fit starts from Gaussian statistics; with data, the calibration passes fit it again.
    read = calibrator.read(site) if calibrator and rule.fits else None
    applied = rule.apply(root, site, decision.check)
    notes = [decision.note] if decision.note else []
    notes += [*applied.notes, *_frozen_note(root, site, rule)]
    more, moved_to = mover.apply(site, structure, applied.kept)
    notes.extend(more)
    why = site.pair.reason if rule.method is not Method.EXACT and method in ("auto", "exact") else None
    move = Move(site.pair, True, rule.method, why, tuple(notes), applied.error, moved_to, rule=rule.name)
    if read is not None and calibrator is not None and moved_to is not None:
        plan = calibrator.plan(read, moved_to, site, mover.modules(site.region))
        return Pending(move, plan, applied.fit_notes)
    if calibrator is not None and rule.fits:
        return Pending(replace(move, notes=(*applied.fit_notes, *move.notes, NOT_CALIBRATED)))
    return Pending(replace(move, notes=(*applied.fit_notes, *move.notes)))


def _absorb(analysis: Analysis, decision: Decision, calibrator: Calibrator | None) -> Pending:
    """A kept affine next to the pair, from an earlier exact move: fit it into the pair's BN."""
    site, kept, mover = decision.site, decision.check.kept, analysis.mover
    assert kept is not None
    read = calibrator.read_absorb(site, kept) if calibrator else None
    applied = ABSORB.apply(_root(analysis, site), site, decision.check)
    mover.forget(site.region)
    move = Move(
        site.pair,
        False,
        ABSORB.method,
        decision.reason,
        tuple(applied.notes),
        applied.error,
        absorbed=kept.name,
        rule=ABSORB.name,
    )
    if read is not None and calibrator is not None:
        # the block now ends at BN″ (A → f → BN′) or where A was (BN′ → f → A)
        end = site.bn_node if kept.side == "before" else kept.node
        bn = qualified(site.region, str(site.bn_node.target))
        plan = calibrator.plan(read, bn, site, mover.modules(site.region), out=end)
        return Pending(move, plan, applied.fit_notes)
    extra = (NOT_CALIBRATED,) if calibrator is not None else ()
    return Pending(replace(move, notes=(*applied.fit_notes, *move.notes, *extra)))

"""Stage 2, *plan*: for every site, what ``convert`` will do to it, decided before anything changes.

A :class:`Decision` names the rule that moves the pair (``exact``, ``fit``,
``swap``; ``absorb`` fits a kept affine of an earlier exact move into the
pair's BN) or says why the pair stays. The reasons are the analysis's own
(:func:`~bnmove.pipeline.analyse.analyse`), so a pair ``inspect`` calls
unmovable stays for the reason ``inspect`` gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import fx

from ..analysis.detect import PLACEMENTS, Site
from ..errors import BnmoveError
from ..moving.absorb import KeptAffine, kept_affine_of
from .analyse import Analysis

Method = Literal["auto", "exact", "fit", "swap"]
METHODS: tuple[Method, ...] = ("auto", "exact", "fit", "swap")
Rule = Literal["exact", "fit", "swap", "absorb"]


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """One clear error for an option outside its choices (placements, methods, data-free fits)."""
    if value not in choices:
        raise BnmoveError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class Decision:
    """What ``convert`` does to one site."""

    site: Site
    #: the rule that moves it; None: it stays, for ``reason``
    rule: Rule | None
    #: why it stays (for ``absorb``: why the pair itself does not move; it is at its placement already)
    reason: str | None
    #: ``absorb``: the kept affine the pair's BN takes in
    kept: KeptAffine | None = None


def plan(analysis: Analysis, placement: str, method: str) -> list[Decision]:
    """One :class:`Decision` per site, in graph order; a node moves with one pair at most."""
    check_choice("placement", placement, PLACEMENTS)
    check_choice("method", method, METHODS)
    decisions = []
    taken: set[fx.Node] = set()
    for site in analysis.sites:
        rule, reason = _rule(site, placement, method, taken)
        kept = None
        if rule is None and method == "fit" and site.pair.placement == placement:
            kept = kept_affine_of(site, analysis.mover.modules(site.region))
            rule = "absorb" if kept is not None else None
        if rule is not None:
            taken.update(n for n in (site.bn_node, site.act_node) if n is not None)
        decisions.append(Decision(site, rule, reason, kept))
    return decisions


def _rule(site: Site, placement: str, method: str, taken: set[fx.Node]) -> tuple[Rule | None, str | None]:
    pair = site.pair
    if pair.placement is None:
        return None, pair.reason
    if pair.placement == placement:
        return None, f"already {placement} the activation"
    if not pair.movable:
        return None, pair.reason
    if site.bn_node in taken or site.act_node in taken:
        return None, "its BatchNorm or activation already moved with another pair"
    if method in ("swap", "fit"):
        return method, None  # type: ignore[return-value]
    if pair.exact:
        return "exact", None
    if method == "exact":
        return None, f"no exact move: {pair.reason}"
    return "fit", None

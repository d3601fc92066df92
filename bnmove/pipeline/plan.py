"""Stage 2, *plan*: for every site, what ``convert`` will do to it, decided before anything changes.

A `Decision` names the rule that moves the pair (`bnmove.rules`)
with what its check found, or says why the pair stays. ``exact`` applies the
exact rule the analysis settled; ``fit`` the fit for the pair's placement, or
a swap where no fit is possible (saying why); ``auto`` the exact rule where
there is one, else the fit; ``swap`` swaps. With ``fit``, a pair already at the
placement asked for takes in a kept affine beside it (``absorb``). The reasons
are the analysis's own, so a pair ``inspect`` calls unmovable stays for the
reason ``inspect`` gave.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import fx

from ..analysis.detect import PLACEMENTS, Site
from ..errors import BnmoveError
from ..rules import ABSORB, FIT, RULES, SWAP, Check, Context, Rule
from ..rules.absorb import kept_affine_of
from .analyse import Analysis

Method = Literal["auto", "exact", "fit", "swap"]
METHODS: tuple[Method, ...] = ("auto", "exact", "fit", "swap")


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
    #: what the rule's check found (the layers a fold goes into, the kept affine an absorb takes in)
    check: Check = field(default_factory=Check)
    #: a note for the report (a fit that became a swap says why)
    note: str | None = None


def plan(analysis: Analysis, placement: str, method: str) -> list[Decision]:
    """One `Decision` per site, in graph order; a node moves with one pair at most."""
    check_choice("placement", placement, PLACEMENTS)
    check_choice("method", method, METHODS)
    decisions = []
    taken: set[fx.Node] = set()
    for site in analysis.sites:
        decision = _decide(site, placement, method, analysis.contexts[site.region], taken)
        if decision.rule is not None:
            taken.update(n for n in (site.bn_node, site.act_node) if n is not None)
        decisions.append(decision)
    return decisions


def _decide(site: Site, placement: str, method: str, context: Context, taken: set[fx.Node]) -> Decision:
    pair = site.pair
    if pair.placement is None:
        return Decision(site, None, pair.reason)
    if pair.placement == placement:
        return _at_placement(site, placement, method, context)
    if not pair.movable:
        return Decision(site, None, pair.reason)
    if site.bn_node in taken or site.act_node in taken:
        return Decision(site, None, "its BatchNorm or activation already moved with another pair")
    if method == "swap":
        return Decision(site, SWAP, None)
    if method != "fit" and site.exact_rule is not None:
        exact = RULES[site.exact_rule]
        assert exact.match(site), f"{exact} settled for a pair it does not match"
        return Decision(site, exact, None, Check(into=site.neighbours))
    if method == "exact":
        return Decision(site, None, f"no exact move: {pair.reason}")
    fit = FIT[pair.placement]
    assert fit.match(site)
    checked = fit.check(site, context)
    if checked.ok:
        return Decision(site, fit, None, checked)
    return Decision(site, SWAP, None, note=f"swapped instead of fitted: {checked.reason}")


def _at_placement(site: Site, placement: str, method: str, context: Context) -> Decision:
    """A pair at the placement asked for stays; with ``fit`` it absorbs a kept affine beside it."""
    reason = f"already {placement} the activation"
    if method != "fit" or kept_affine_of(site, context.modules) is None:
        return Decision(site, None, reason)
    checked = ABSORB.check(site, context)
    if checked.ok:
        return Decision(site, ABSORB, reason, checked)
    return Decision(site, None, f"{reason}; kept affine stays: {checked.reason}")

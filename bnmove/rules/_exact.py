"""What the exact rules share: their precondition (`ExactRule`), and BN′, the identity that
holds new statistics.

After an exact move the old BN module stays in place as BN′: in eval mode the
identity (``weight = sqrt(var + eps)``, ``bias = mean``), holding as running
statistics the moments of its new input, so that training from the converted
model starts from where the old BN's statistics point (docs/design/math.md).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..analysis.detect import Site
from ..core import bn_math, piecewise, rectified
from ._parameters import (
    RELU_KEYS,
    _BatchNorm,
    batchnorm_at,
    gamma_beta,
    make_identity,
    pair_activation,
    pair_activation_key,
    pieces_of,
)
from .base import Check, Context, Method, Prime, Rule, refuse

_NO_FUNCTION_NOTE = "activation takes runtime tensors; new BN statistics set to mean 0, var 1"


def statistics_refusal(module: nn.Module | None) -> str | None:
    """Why the BN has no eval-mode map to fold or keep, or None."""
    if module is None:
        return "functional batch_norm: an exact move needs a BatchNorm module"
    if isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
        return "lazy BatchNorm not initialised yet (run one forward pass first)"
    if not getattr(module, "track_running_stats", True) or module.running_mean is None:
        return "track_running_stats=False: the BN has no running statistics to fold"
    return None


def bn_module(site: Site, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(site.bn_node.target)) if site.bn_node.op == "call_module" else None


class ExactRule(Rule):
    """A rule that keeps the eval-mode function: it needs the BN's eval-mode map, so a BN without
    running statistics (or a functional one) is refused here, once, for every exact rule."""

    method = Method.EXACT
    exact = True

    def check(self, site: Site, context: Context) -> Check:
        module = bn_module(site, context.modules)
        stats = statistics_refusal(module)
        if stats is not None:
            return refuse(stats)
        assert module is not None
        return self.check_map(site, context, module)

    @abstractmethod
    def check_map(self, site: Site, context: Context, bn: nn.Module) -> Check:
        """The rule's own check, for a BN that has an eval-mode map."""


def _given(site: Site, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """What BN′'s statistics are a function of: ``(beta, gamma)`` for BN′ after ``f`` (the old BN's
    train-mode output is N(beta, gamma²)), the old running ``(mean, var)`` for BN′ before ``f``."""
    if site.pair.placement == "before":
        gamma, beta = gamma_beta(bn)
        return beta, gamma
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()


def _closed_form(key: Hashable | None) -> bool:
    """ReLU and the piecewise polynomials: solved from their key alone, with no function to call."""
    return key in RELU_KEYS or pieces_of(key) is not None


def _solve(
    f: bn_math.Activation | None,
    key: Hashable | None,
    after: bool,
    given: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BN′'s ``(mean, var)`` per channel and which channels a Gaussian explains.

    After ``f``: the moments of ``f`` of N(beta, gamma²). Before ``f``: the Gaussian whose image
    under ``f`` has the old statistics; channels no Gaussian explains get mean 0, var 1. In closed
    form for ReLU (`bnmove.core.rectified`) and the other piecewise-polynomial activations
    (`bnmove.core.piecewise`), by Gauss–Hermite quadrature for any other ``f``
    (``bn_math.gaussian_moments``, ``bn_math.match_gaussian``)."""
    pieces = pieces_of(key)
    if after:
        if key in RELU_KEYS:
            mean, var = rectified.relu_moments(*given)
        elif pieces is not None:
            mean, var = piecewise.moments(pieces, *given)
        else:
            assert f is not None
            mean, var = bn_math.gaussian_moments(f, *given)
        return mean, var, torch.ones_like(mean, dtype=torch.bool)
    if key in RELU_KEYS:
        mu, sigma, ok = rectified.match_relu(*given)
    elif pieces is not None:
        mu, sigma, ok = piecewise.match(pieces, *given)
    else:
        assert f is not None
        mu, sigma, ok = bn_math.match_gaussian(f, *given)
    return torch.where(ok, mu, torch.zeros_like(mu)), torch.where(ok, sigma**2, torch.ones_like(sigma)), ok


def _prime(
    given: tuple[torch.Tensor, torch.Tensor], mean: torch.Tensor, var: torch.Tensor, ok: torch.Tensor
) -> Prime:
    if bool(ok.all()):
        return Prime(given, mean, var)
    note = (
        f"{int((~ok).sum())} of {ok.numel()} channels: no Gaussian input explains the old "
        "statistics; new BN statistics set to mean 0, var 1 there"
    )
    return Prime(given, mean, var, (note,))


class _Request(NamedTuple):
    site: Site
    f: bn_math.Activation | None  # None: solved in closed form
    key: Hashable | None
    given: tuple[torch.Tensor, torch.Tensor]


def solve_primes(moves: Sequence[tuple[nn.Module, Site, Rule]]) -> dict[Site, Prime]:
    """The statistics of every BN′ the exact rules among ``(root, site, rule)`` will leave, at once:
    one batched solve per activation and side (the channels are independent, so N BNs of one
    activation cost one solve, not N). Sites whose activation needs runtime tensors get none
    (`identity` handles them)."""
    groups: dict[Hashable, list[_Request]] = {}
    for root, site, rule in moves:
        if not isinstance(rule, ExactRule):
            continue
        key = pair_activation_key(root, site)
        closed = _closed_form(key)
        f = None if closed else pair_activation(root, site)
        if f is None and not closed:
            continue
        group = (site.pair.placement, key) if key is not None else site  # unknown: solved alone
        given = _given(site, batchnorm_at(root, str(site.bn_node.target)))
        groups.setdefault(group, []).append(_Request(site, f, key, given))
    primes: dict[Site, Prime] = {}
    for members in groups.values():
        first = members[0]
        together = (torch.cat([m.given[0] for m in members]), torch.cat([m.given[1] for m in members]))
        solved = _solve(first.f, first.key, first.site.pair.placement == "before", together)
        sizes = [m.given[0].numel() for m in members]
        for member, mean, var, ok in zip(members, *(t.split(sizes) for t in solved), strict=True):
            primes[member.site] = _prime(member.given, mean, var, ok)
    return primes


def identity(root: nn.Module, site: Site, bn: _BatchNorm, prime: Prime | None = None) -> list[str]:
    """Make the moved BN into BN′ on the other side of ``f``: the identity in eval mode, holding the
    statistics of its new input (``prime``, solved with the others, or solved here)."""
    given = _given(site, bn)
    if prime is None or not prime.solved_from(given):
        f = pair_activation(root, site)
        if f is None:
            make_identity(bn, torch.zeros_like(given[0]), torch.ones_like(given[1]))
            return [_NO_FUNCTION_NOTE]
        key = pair_activation_key(root, site)
        prime = _prime(given, *_solve(f, key, site.pair.placement == "before", given))
    make_identity(bn, prime.mean, prime.var)
    return list(prime.notes)

"""What the exact rules share: their precondition (`ExactRule`), and BN′, the identity that
holds new statistics.

After an exact move the old BN module stays in place as BN′: in eval mode the
identity (``weight = sqrt(var + eps)``, ``bias = mean``), holding as running
statistics the moments of its new input, so that training from the converted
model starts from where the old BN's statistics point (docs/design/math.md).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from ..analysis.detect import Site
from ..core import bn_math
from ._parameters import _BatchNorm, gamma_beta, make_identity, pair_activation
from .base import Check, Context, Method, Rule, refuse

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


def identity_after(root: nn.Module, site: Site, bn: _BatchNorm) -> list[str]:
    """BN′ after ``f``: the old BN's train-mode output is N(beta, gamma²) per channel, so BN′ holds
    the moments of ``f`` of that Gaussian (``bn_math.gaussian_moments``)."""
    gamma, beta = gamma_beta(bn)
    f = pair_activation(root, site)
    if f is None:
        make_identity(bn, torch.zeros_like(beta), torch.ones_like(beta))
        return [_NO_FUNCTION_NOTE]
    make_identity(bn, *bn_math.gaussian_moments(f, beta, gamma))
    return []


def identity_before(root: nn.Module, site: Site, bn: _BatchNorm) -> list[str]:
    """BN′ before ``f``: the Gaussian whose image under ``f`` has the old BN's statistics
    (``bn_math.match_gaussian``); channels no Gaussian explains get mean 0, var 1."""
    assert bn.running_mean is not None and bn.running_var is not None
    target_mean = bn.running_mean.detach().double().cpu()
    target_var = bn.running_var.detach().double().cpu()
    f = pair_activation(root, site)
    if f is None:
        make_identity(bn, torch.zeros_like(target_mean), torch.ones_like(target_var))
        return [_NO_FUNCTION_NOTE]
    mu, sigma, ok = bn_math.match_gaussian(f, target_mean, target_var)
    make_identity(
        bn, torch.where(ok, mu, torch.zeros_like(mu)), torch.where(ok, sigma**2, torch.ones_like(sigma))
    )
    if bool(ok.all()):
        return []
    return [
        f"{int((~ok).sum())} of {ok.numel()} channels: no Gaussian input explains the old "
        "statistics; new BN statistics set to mean 0, var 1 there"
    ]

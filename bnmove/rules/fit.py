"""Fit: a pair moves by fitting BN′ so the moved block reproduces the old one.

* `FitAfter`, ``BN → f`` becomes ``f → BN′`` with ``BN′(u) = a′·u + b′``:
  linear least squares of ``a′·f(z) + b′`` against ``f(a·z + b)`` per channel.
* `FitBefore`, ``f → BN`` becomes ``BN′ → f``: ``f(a′·z + b′)`` against
  ``a·f(z) + b`` per channel, by Levenberg–Marquardt.

Data-free, ``z`` is Gaussian with the BN's own statistics (``BN → f``), or the
Gaussian whose image under ``f`` has them (``f → BN``), on Gauss–Hermite nodes
(docs/design/math.md, "Fitting"). BN′ gets the real moments of its new input as
running statistics. With calibration data the passes of
`bnmove.fitting.sequential` fit again on real inputs. Where no fit is
possible the plan swaps the pair instead and says why.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from ..analysis.detect import Site
from ..core import bn_math, fit_math
from ..core.affine import affine_map
from ._exact import bn_module
from ._parameters import _BatchNorm, batchnorm_at, pair_activation, set_bn
from .base import Applied, Check, Context, Method, Rule, refuse

Samples = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # z (K, C), weights (K,), target (K, C)


def fit_refusal(site: Site, root: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Why the pair's BN cannot be fitted: no module to hold the parameters, no statistics to fit
    against, or an activation that cannot be evaluated on its own."""
    if site.bn_node.op != "call_module":
        return "functional batch_norm has no module to hold the fitted parameters"
    module = bn_module(site, modules)
    if (
        module is None
        or getattr(module, "running_mean", None) is None
        or getattr(module, "running_var", None) is None
    ):
        return "track_running_stats=False: no statistics to fit against"
    if pair_activation(root, site) is None:
        return "the activation takes runtime tensors, so it cannot be evaluated for fitting"
    return None


class _Fit(Rule):
    method = Method.FIT_DATA_FREE
    fits = True

    def check(self, site: Site, context: Context) -> Check:
        why = fit_refusal(site, context.root, context.modules)
        return Check() if why is None else refuse(why)

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        bn = batchnorm_at(root, str(site.bn_node.target))
        f = pair_activation(root, site)
        assert f is not None and bn.running_mean is not None and bn.running_var is not None
        effect = self.fit(bn, f, self.samples(bn, f))
        return Applied(error=effect)

    @abstractmethod
    def samples(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor]) -> Samples:
        """Gaussian inputs ``z`` with weights, and the old block's output on them."""

    @abstractmethod
    def fit(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor], samples: Samples) -> float:
        """Give ``bn`` the parameters fitted on ``samples`` and new statistics; the block's relative
        RMS error on them."""


def _statistics(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean.detach().double().cpu(), bn.running_var.detach().double().cpu()


class FitAfter(_Fit):
    """``BN → f`` becomes ``f → BN′``, ``BN′`` fitted by least squares."""

    name = "fit-after"
    moves = "before"

    def samples(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor]) -> Samples:
        a, b = (t.cpu() for t in affine_map(bn))
        mean, var = _statistics(bn)
        z, w = fit_math.gaussian_samples(mean, var.sqrt())  # the BN's input, N(running_mean, running_var)
        with torch.no_grad():
            target = f(a[None, :] * z + b[None, :]).double()
        return z, w, target

    def fit(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor], samples: Samples) -> float:
        z, w, target = samples
        a2, b2, mean, var = fit_math.fit_after(f, z, w, target)
        with torch.no_grad():
            effect = fit_math.relative_rmse(a2[None, :] * f(z.clone()).double() + b2[None, :], target, w)
        set_bn(bn, *fit_math.bn_params_for_affine(a2, b2, mean, var, float(bn.eps)), mean, var)
        return effect


class FitBefore(_Fit):
    """``f → BN`` becomes ``BN′ → f``, ``BN′`` fitted by Levenberg–Marquardt."""

    name = "fit-before"
    moves = "after"

    def samples(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor]) -> Samples:
        a, b = (t.cpu() for t in affine_map(bn))
        mean, var = _statistics(bn)
        # z is f's input: the Gaussian whose image under f has the BN's statistics
        mu, sigma, ok = bn_math.match_gaussian(f, mean, var)
        mu = torch.where(ok, mu, torch.zeros_like(mu))
        sigma = torch.where(ok, sigma, torch.ones_like(sigma))
        z, w = fit_math.gaussian_samples(mu, sigma)
        with torch.no_grad():
            target = a[None, :] * f(z.clone()).double() + b[None, :]
        return z, w, target

    def fit(self, bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor], samples: Samples) -> float:
        z, w, target = samples
        a, b = (t.cpu() for t in affine_map(bn))
        a2, b2 = fit_math.fit_before(f, z, w, target, (a, b))
        mean, var = fit_math.weighted_moments(z, w)
        with torch.no_grad():
            effect = fit_math.relative_rmse(f(a2[None, :] * z + b2[None, :]).double(), target, w)
        set_bn(bn, *fit_math.bn_params_for_affine(a2, b2, mean, var, float(bn.eps)), mean, var)
        return effect

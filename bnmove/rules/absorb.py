"""Absorb: the affine layers exact moves keep, removed by fitting: ``method="fit"`` on a converted model.

An exact move keeps a BN's affine map ``A(z) = a·z + b`` as a [`ChannelAffine`][bnmove.core.affine.ChannelAffine] where no
neighbour can absorb it: ``X → A → f → BN′`` (BN moved after) or ``BN′ → f → A → N`` (moved
before). A user who wants no extra layer converts that model again with ``fit``; each such ``A``
is then absorbed into the BN on the other side of the activation with the least-squares math of
``fit`` (docs/design/math.md, "Fitting"), and replaced by ``nn.Identity``:

* ``A → f → BN′`` becomes ``f → BN″``: ``c·f(z) + d ≈ f(a·z + b)`` per channel (linear least
  squares), composed with BN′'s own map; BN″ holds the statistics of its new input ``f(z)``.
* ``BN′ → f → A`` becomes ``BN″ → f``: ``f(c·z + d) ≈ a·f(BN′(z)) + b`` (Levenberg–Marquardt,
  started from BN′'s map); BN″'s input, and so its statistics, are BN′'s.

Data-free, ``z`` is Gaussian: for ``A → f → BN′`` the Gaussian whose image under ``f`` has BN′'s
statistics (mapped back through ``A``), for ``BN′ → f → A`` BN′'s own statistics. With
calibration data the passes of `bnmove.fitting.sequential` fit again on real inputs.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
from torch import fx, nn

from ..analysis.detect import Site
from ..analysis.nodes import skip_identity_down, skip_identity_up
from ..core import bn_math, fit_math
from ..core.affine import ChannelAffine, affine_map
from ..core.modules import set_submodule
from ._parameters import pair_activation, set_bn
from .base import Applied, Check, Context, KeptAffine, Method, Rule, refuse
from .fit import fit_refusal


def kept_affine_of(site: Site, modules: dict[str, nn.Module]) -> KeptAffine | None:
    """The ChannelAffine on the far side of the pair's activation, if the pair has one that feeds
    (or is fed by) nothing else."""
    act = site.act_node
    if act is None or site.bn_node.op != "call_module" or site.pair.placement is None:
        return None
    if site.pair.placement == "after":  # f → BN′: is f fed by A?
        source = act.args[0] if act.args else None
        if not isinstance(source, fx.Node):
            return None
        node = skip_identity_up(source, modules)
        if len(node.users) != 1 or len(source.users) != 1:
            return None
        side: Literal["before", "after"] = "before"
    else:  # BN′ → f: does f feed A alone?
        end = skip_identity_down(act, modules)
        if len(end.users) != 1:
            return None
        (node,) = end.users
        side = "after"
    if node.op != "call_module" or not isinstance(modules.get(str(node.target)), ChannelAffine):
        return None
    bn = modules[str(site.bn_node.target)]
    affine = modules[str(node.target)]
    assert isinstance(affine, ChannelAffine)
    if getattr(bn, "num_features", None) != affine.weight.numel():
        return None
    return KeptAffine(node, str(node.target), side)


class Absorb(Rule):
    """A kept affine beside a pair already at its placement, fitted into the pair's BN."""

    name = "absorb"
    method = Method.FIT_DATA_FREE
    fits = True

    def check(self, site: Site, context: Context) -> Check:
        kept = kept_affine_of(site, context.modules)
        if kept is None:
            return refuse("no kept affine beside the activation")
        why = fit_refusal(site, context.root, context.modules)
        if why is not None:
            return refuse(why)
        affine = context.modules[kept.name]
        assert isinstance(affine, ChannelAffine)
        if kept.side == "before" and bool((affine.weight == 0).any()):
            return refuse("the kept affine zeroes a channel, so its input cannot be recovered")
        return Check(kept=kept)

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        """Fit the kept affine into the pair's BN on Gaussian inputs; its slot becomes ``nn.Identity``."""
        kept = check.kept
        assert kept is not None
        bn = root.get_submodule(str(site.bn_node.target))
        f = pair_activation(root, site)
        assert f is not None
        affine = root.get_submodule(kept.name)
        assert isinstance(affine, ChannelAffine)
        a, b = (t.detach().double().cpu() for t in (affine.weight, affine.bias))
        a1, b1 = (t.cpu() for t in affine_map(bn))
        mean = cast(torch.Tensor, bn.running_mean).detach().double().cpu()
        var = cast(torch.Tensor, bn.running_var).detach().double().cpu()
        eps = float(cast(float, bn.eps))
        # no torch.no_grad(): the fits differentiate f (Newton, Levenberg–Marquardt); no input needs grad
        if kept.side == "before":  # A → f → BN′: z is A's input; f's input u = a z + b
            mu, sigma, ok = bn_math.match_gaussian(f, mean, var)
            mu = torch.where(ok, mu, torch.zeros_like(mu))
            sigma = torch.where(ok, sigma, torch.ones_like(sigma))
            u, w = fit_math.gaussian_samples(mu, sigma)
            z = (u - b[None, :]) / a[None, :]
            target = a1[None, :] * f(u.clone()).double() + b1[None, :]
            c, d, new_mean, new_var = fit_math.fit_after(f, z, w, target)
            effect = fit_math.relative_rmse(c[None, :] * f(z.clone()).double() + d[None, :], target, w)
        else:  # BN′ → f → A: z is BN′'s input
            z, w = fit_math.gaussian_samples(mean, var.sqrt())
            target = a[None, :] * f(a1[None, :] * z + b1[None, :]).double() + b[None, :]
            c, d = fit_math.fit_before(f, z, w, target, (a1, b1))
            new_mean, new_var = fit_math.weighted_moments(z, w)
            effect = fit_math.relative_rmse(f(c[None, :] * z + d[None, :]).double(), target, w)
        set_bn(bn, *fit_math.bn_params_for_affine(c, d, new_mean, new_var, eps), new_mean, new_var)  # type: ignore[arg-type]
        set_submodule(root, kept.name, nn.Identity())
        return Applied(
            [f"kept affine {kept.name} absorbed into {site.bn_node.target} by fitting"], error=effect
        )

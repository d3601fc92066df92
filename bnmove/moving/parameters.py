"""What a move does to parameters: exact folds and kept affines, fits, swaps (``adjust``).

The structure of the move (module slots, regenerated forwards) is :mod:`.placing`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..analysis.detect import Site
from ..analysis.patterns import is_frozen_batchnorm
from ..core import bn_math
from ..core.affine import ChannelAffine, affine_map
from .rewrite import (
    batchnorm_at,
    fold_map,
    gamma_beta,
    kept_affine,
    make_identity,
    pair_activation,
    set_bn,
)

_NO_FUNCTION_NOTE = "activation takes runtime tensors; new BN statistics set to mean 0, var 1"


def _fold_or_keep(
    root: nn.Module, site: Site, fold: Callable[..., Any]
) -> tuple[_BatchNorm, ChannelAffine | None]:
    """Fold the BN into the pair's neighbour, or (no neighbour) take its affine map out as a layer."""
    bn = batchnorm_at(root, str(site.bn_node.target))
    if not site.neighbours:
        return bn, kept_affine(bn)
    a, b = affine_map(bn)  # read once: every neighbour takes the same map
    for neighbour in site.neighbours:
        fold_map(root, a, b, str(neighbour.target), fold)
    return bn, None


def exact_before_to_after(root: nn.Module, site: Site) -> tuple[list[str], ChannelAffine | None]:
    """Parameters of ``L -> BN -> f`` becoming ``L' -> f -> BN'`` (or ``X -> A -> f -> BN'``), eval outputs kept."""
    notes: list[str] = []
    bn, affine = _fold_or_keep(root, site, bn_math.fold_into_preceding)
    # The old BN's train-mode output is N(beta, gamma^2) per channel: f of that is what BN' will see.
    gamma, beta = gamma_beta(bn)
    f = pair_activation(root, site)
    if f is None:
        mean, var = torch.zeros_like(beta), torch.ones_like(beta)
        notes.append(_NO_FUNCTION_NOTE)
    else:
        mean, var = bn_math.gaussian_moments(f, beta, gamma)
    make_identity(bn, mean, var)
    return notes, affine


def exact_after_to_before(root: nn.Module, site: Site) -> tuple[list[str], ChannelAffine | None]:
    """Parameters of ``f -> BN -> N`` becoming ``BN' -> f -> N'`` (or ``BN' -> f -> A -> N``), eval outputs kept."""
    notes: list[str] = []
    bn, affine = _fold_or_keep(root, site, bn_math.fold_into_following)
    assert bn.running_mean is not None and bn.running_var is not None
    # BN' sits where f's input is: find the Gaussian whose image under f has the old BN's statistics.
    f = pair_activation(root, site)
    target_mean = bn.running_mean.detach().double().cpu()
    target_var = bn.running_var.detach().double().cpu()
    if f is None:
        mean, var = torch.zeros_like(target_mean), torch.ones_like(target_var)
        notes.append(_NO_FUNCTION_NOTE)
    else:
        mu, sigma, ok = bn_math.match_gaussian(f, target_mean, target_var)
        mean = torch.where(ok, mu, torch.zeros_like(mu))
        var = torch.where(ok, sigma**2, torch.ones_like(sigma))
        if not bool(ok.all()):
            notes.append(
                f"{int((~ok).sum())} of {ok.numel()} channels: no Gaussian input explains the old "
                "statistics; new BN statistics set to mean 0, var 1 there"
            )
    make_identity(bn, mean, var)
    return notes, affine


@dataclass
class FitSamples:
    """Per-channel samples of the pair's input ``z`` and the block output to reproduce."""

    z: torch.Tensor  # (K, C) float64
    w: torch.Tensor  # (K,) weights summing to 1
    target: torch.Tensor  # (K, C) float64
    source: str  # "data-free", "calibrated" (real data) or "synthetic" (made from BN statistics)


class CannotFit(Exception):
    """This pair cannot be fitted (the caller swaps it instead, and says why)."""


def _data_free_samples(
    bn: _BatchNorm, f: Callable[[torch.Tensor], torch.Tensor], placement: str
) -> FitSamples:
    """Gaussian inputs from the BN's own statistics; the target is what the original block computes."""
    assert bn.running_mean is not None and bn.running_var is not None
    a, b = (t.cpu() for t in affine_map(bn))
    mean = bn.running_mean.detach().double().cpu()
    var = bn.running_var.detach().double().cpu()
    if placement == "before":  # BN -> f: z is the BN's input, N(running_mean, running_var)
        z, w = bn_math.gaussian_samples(mean, var.sqrt())
        with torch.no_grad():
            target = f(a[None, :] * z + b[None, :]).double()
    else:  # f -> BN: z is f's input; find the Gaussian whose image under f has the BN's statistics
        mu, sigma, ok = bn_math.match_gaussian(f, mean, var)
        mu = torch.where(ok, mu, torch.zeros_like(mu))
        sigma = torch.where(ok, sigma, torch.ones_like(sigma))
        z, w = bn_math.gaussian_samples(mu, sigma)
        with torch.no_grad():
            target = a[None, :] * f(z.clone()).double() + b[None, :]
    return FitSamples(z, w, target, "data-free")


def fit_pair(root: nn.Module, site: Site, samples: FitSamples | None) -> tuple[list[str], float]:
    """Fit BN' so the moved block reproduces the old one (docs/design/math.md, "Fitting").

    ``BN -> f`` becomes ``f -> BN'`` with ``BN'(u) = a' u + b'`` fitted by least
    squares; ``f -> BN`` becomes ``BN' -> f`` with ``f(a' z + b')`` fitted by
    Levenberg–Marquardt. BN' gets the real moments of its new input as running
    statistics. Returns notes and the block's relative RMS error on the samples.
    """
    assert site.pair.placement is not None
    if site.bn_node.op != "call_module":
        raise CannotFit("functional batch_norm has no module to hold the fitted parameters")
    bn = batchnorm_at(root, str(site.bn_node.target))
    if bn.running_mean is None or bn.running_var is None:
        raise CannotFit("track_running_stats=False: no statistics to fit against")
    f = pair_activation(root, site)
    if f is None:
        raise CannotFit("the activation takes runtime tensors, so it cannot be evaluated for fitting")
    placement = site.pair.placement
    if samples is None:
        samples = _data_free_samples(bn, f, placement)
    z, w, target = samples.z, samples.w, samples.target
    eps = float(bn.eps)
    if placement == "before":
        a2, b2, mean, var = bn_math.fit_after(f, z, w, target)
        with torch.no_grad():
            effect = bn_math.relative_rmse(a2[None, :] * f(z.clone()).double() + b2[None, :], target, w)
        set_bn(bn, *bn_math.bn_params_for_affine(a2, b2, mean, var, eps), mean, var)
    else:
        a, b = (t.cpu() for t in affine_map(bn))
        a2, b2 = bn_math.fit_before(f, z, w, target, (a, b))
        mean, var = bn_math.weighted_moments(z, w)
        with torch.no_grad():
            effect = bn_math.relative_rmse(f(a2[None, :] * z + b2[None, :]).double(), target, w)
        set_bn(bn, *bn_math.bn_params_for_affine(a2, b2, mean, var, eps), mean, var)
    return [f"{samples.source} fit: block error {effect:.3f} (relative RMS)"], effect


def adjust(
    root: nn.Module, site: Site, method: str, samples: FitSamples | None = None
) -> tuple[str, list[str], float | None, ChannelAffine | None]:
    """The parameter side of one move (``"exact"``, ``"fit"`` or ``"swap"``) of ``site``.

    Returns the method really used (``"exact"`` folded, ``"exact-kept-affine"``,
    ``"fit-…"``, or ``"swap"`` for a pair that cannot be fitted, with the
    reason in the notes), notes for the report, the fitted block's error, and
    the kept affine layer the caller must place. The caller then moves the
    modules or nodes (:mod:`bnmove.moving.placing`).
    """
    effect: float | None = None
    used = method
    notes: list[str] = []
    affine: ChannelAffine | None = None
    if method == "fit":
        try:
            notes, effect = fit_pair(root, site, samples)
            used = f"fit-{samples.source}" if samples is not None else "fit-data-free"
        except CannotFit as why:
            notes, used = [f"swapped instead of fitted: {why}"], "swap"
    elif method == "exact":
        if site.pair.placement == "before":
            notes, affine = exact_before_to_after(root, site)
        else:
            notes, affine = exact_after_to_before(root, site)
        if affine is not None:
            used = "exact-kept-affine"
    if site.bn_node.op == "call_module" and is_frozen_batchnorm(root.get_submodule(str(site.bn_node.target))):
        notes.append(
            "frozen BN: it never normalises, so the move folds its affine away and leaves it as the "
            "identity on the other side (it stays frozen)"
            if used.startswith("exact")
            else "frozen BN: it keeps a fixed affine map on the other side and never normalises"
        )
    return used, notes, effect, affine

"""Pure tensor math behind every move; no graph access here.

Eval-mode BatchNorm is a per-channel affine map ``BN(z) = a*z + b`` with
``a = gamma / sqrt(var + eps)`` and ``b = beta - a*mean``.

* Folding backward (``L -> BN`` becomes ``L'``): ``W'[c] = a_c * W[c]``,
  ``bias'[c] = a_c * bias[c] + b_c``.
* Folding forward (``BN -> N`` becomes ``N'``): ``W'[:, c] = W[:, c] * a_c``,
  ``bias' = bias + sum_c (sum_kernel W[:, c]) * b_c``; exact only when every
  output of N sees every kernel tap on real (unpadded) input.
* An *identity BN* holds real statistics ``(m, v)`` yet is the identity in
  eval mode: ``weight = sqrt(v + eps)``, ``bias = m``.

All math runs in float64 and is cast back by the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` of eval-mode BN, in float64."""
    mean = running_mean.detach().double()
    a = 1.0 / torch.sqrt(running_var.detach().double() + eps)
    if weight is not None:
        a = a * weight.detach().double()
    b = -a * mean
    if bias is not None:
        b = b + bias.detach().double()
    return a, b


def _channel_view(t: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return t.reshape(shape)


def fold_into_preceding(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(z) = a*z + b`` into the layer that feeds it.

    ``weight`` is a Linear ``(out, in)``, a Conv ``(out, in/groups, *k)`` or a
    ConvTranspose ``(in, out/groups, *k)`` weight. Returns float64
    ``(weight', bias')`` with ``layer'(x) == BN(layer(x))``.
    """
    w = weight.detach().double()
    out_bias = torch.zeros_like(a) if bias is None else bias.detach().double()
    if transposed:
        # Output channel o = g*(out/groups) + j lives at weight[g-block, j].
        in_ch, out_per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
        scale = a.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))
        new_w = (grouped * scale).reshape(w.shape)
    else:
        new_w = w * _channel_view(a, w.dim(), 0)
    return new_w, a * out_bias + b


def fold_into_following(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(z) = a*z + b`` into the layer it feeds.

    Returns float64 ``(weight', bias')`` with ``layer'(z) == layer(BN(z))`` for a
    Linear, an unpadded Conv, or a pointwise stride-1 ConvTranspose.
    """
    w = weight.detach().double()
    if transposed:
        in_ch, out_per_group = w.shape[0], w.shape[1]
        new_w = w * _channel_view(a, w.dim(), 0)
        # sum over kernel taps -> (in, out/groups); each input channel feeds its group.
        tap_sum = w.reshape(in_ch, out_per_group, -1).sum(-1)
        shift = (tap_sum * b[:, None]).reshape(groups, in_ch // groups, out_per_group).sum(1)
        shift = shift.reshape(-1)
    else:
        out_ch, in_per_group = w.shape[0], w.shape[1]
        new_w = w * a.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, -1).reshape(
            out_ch, in_per_group, *([1] * (w.dim() - 2))
        )
        tap_sum = w.reshape(out_ch, in_per_group, -1).sum(-1)
        b_per_out = b.reshape(groups, 1, in_per_group).expand(groups, out_ch // groups, -1)
        shift = (tap_sum * b_per_out.reshape(out_ch, in_per_group)).sum(1)
    out_bias = torch.zeros_like(shift) if bias is None else bias.detach().double()
    return new_w, out_bias + shift


def identity_bn_params(
    mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` that make a BN with running stats ``(mean, var)`` the identity in eval."""
    return torch.sqrt(var.double() + eps), mean.double().clone()


@functools.lru_cache(maxsize=8)
def _hermite_nodes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights / weights.sum())


def gaussian_moments(
    f: Activation, mean: torch.Tensor, std: torch.Tensor, *, nodes: int = 96
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E f(z)`` and ``Var f(z)`` for ``z ~ N(mean_c, std_c^2)``, per channel.

    Gauss–Hermite quadrature; ``f`` is called on a ``(nodes, C)`` float64
    tensor, so per-channel activations (PReLU) see channels on dim 1.
    """
    x, w = _hermite_nodes(nodes)
    z = mean.double()[None, :] + std.double().abs()[None, :] * x[:, None]
    y = f(z.clone()).double()
    m = (w[:, None] * y).sum(0)
    var = (w[:, None] * (y - m) ** 2).sum(0)
    return m, var.clamp_min(0.0)


def match_gaussian(
    f: Activation,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    *,
    steps: int = 60,
    nodes: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find ``N(mu, sigma^2)`` per channel whose ``E f``, ``Var f`` hit the targets.

    Damped Newton on ``(mu, log sigma)``, all channels at once (they are
    independent, so per-channel Jacobians come from two autograd passes).
    Returns ``(mu, sigma, converged)``; channels that do not converge (targets
    outside what ``f`` can produce) are reported, not guessed.
    """
    tm, tv = target_mean.double(), target_var.double().clamp_min(1e-12)
    mu = tm.clone()
    log_s = 0.5 * torch.log(tv)
    x, w = _hermite_nodes(nodes)
    scale_m = tv.sqrt() + 1e-6
    for _ in range(steps):
        mu = mu.detach().requires_grad_(True)
        log_s = log_s.detach().requires_grad_(True)
        z = mu[None, :] + torch.exp(log_s)[None, :] * x[:, None]
        y = f(z)
        m = (w[:, None] * y).sum(0)
        v = (w[:, None] * (y - m) ** 2).sum(0)
        r1 = (m - tm) / scale_m
        r2 = 0.5 * (torch.log(v + 1e-12) - torch.log(tv))
        g1 = torch.autograd.grad(r1.sum(), (mu, log_s), retain_graph=True)
        g2 = torch.autograd.grad(r2.sum(), (mu, log_s))
        det = g1[0] * g2[1] - g1[1] * g2[0]
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        d_mu = (g2[1] * r1 - g1[1] * r2) / det
        d_ls = (-g2[0] * r1 + g1[0] * r2) / det
        with torch.no_grad():
            mu = mu - torch.clamp(0.7 * d_mu, -2.0 * scale_m, 2.0 * scale_m)
            log_s = log_s - (0.7 * d_ls).clamp(-1.0, 1.0)
    with torch.no_grad():
        m, v = gaussian_moments(f, mu, torch.exp(log_s), nodes=nodes)
        converged = ((m - tm).abs() <= 1e-3 * (tv.sqrt() + 1e-3)) & ((v - tv).abs() <= 1e-2 * tv + 1e-8)
    return mu.detach(), torch.exp(log_s).detach(), converged

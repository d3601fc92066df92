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
from typing import Any

import numpy as np
import torch

Activation = Callable[[torch.Tensor], torch.Tensor]


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel ``(a, b)`` of eval-mode BN, and the ``√(var + ε)`` that ``a`` divides by, in float64."""
    mean = running_mean.detach().double()
    scale = torch.sqrt(running_var.detach().double() + eps)
    a = 1.0 / scale
    if weight is not None:
        a = a * weight.detach().double()
    b = -a * mean
    if bias is not None:
        b = b + bias.detach().double()
    return a, b, scale


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
    dtype: torch.dtype = torch.float64,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(z) = a*z + b`` into the layer that feeds it.

    ``weight`` is a Linear ``(out, in)``, a Conv ``(out, in/groups, *k)`` or a
    ConvTranspose ``(in, out/groups, *k)`` weight. Returns ``(weight', bias')`` with
    ``layer'(x) == BN(layer(x))``: the weight scaled in ``dtype`` (see `_scaled`), the bias in
    float64. ``inplace``: ``weight`` itself is scaled and returned where it is of ``dtype``
    (the same numbers, without a temporary the size of the weight).
    """
    w = _scaled(weight, dtype)
    scale = a.to(dtype)
    out_bias = torch.zeros_like(a) if bias is None else bias.detach().double()
    if transposed:
        # Output channel o = g*(out/groups) + j lives at weight[g-block, j].
        in_ch, out_per_group = w.shape[0], w.shape[1]
        view = scale.reshape(groups, 1, out_per_group, *([1] * (w.dim() - 2)))
        grouped = w.reshape(groups, in_ch // groups, out_per_group, *w.shape[2:])
    else:
        view, grouped = _channel_view(scale, w.dim(), 0), w
    scaled = grouped.mul_(view) if inplace and w.dtype == weight.dtype else grouped * view
    return scaled.reshape(w.shape), a * out_bias + b


def _scaled(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as it is scaled per channel: in float64 by default; a conversion scales a float32
    weight in float32 (``dtype``), which rounds the scale and the product (within two units in the
    last place of the float64 fold rounded once) and spares the copies in float64 that made
    scaling resnet50's weights cost a third of its forward pass."""
    return weight.detach().to(dtype)


def fold_into_following(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
    dtype: torch.dtype = torch.float64,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``BN(z) = a*z + b`` into the layer it feeds.

    Returns ``(weight', bias')`` with ``layer'(z) == layer(BN(z))`` for a Linear, an unpadded
    Conv, or a pointwise stride-1 ConvTranspose: the weight scaled in ``dtype`` (see `_scaled`),
    the bias in float64 (the kernel's sums accumulate in float64 whatever ``dtype``).
    ``inplace``: as `fold_into_preceding`'s.
    """
    w = _scaled(weight, dtype)
    scale = a.to(dtype)
    if transposed:
        in_ch, out_per_group = w.shape[0], w.shape[1]
        view = _channel_view(scale, w.dim(), 0)
        # sum over kernel taps -> (in, out/groups); each input channel feeds its group.
        tap_sum = _tap_sums(w.reshape(in_ch, out_per_group, -1))
        shift = (tap_sum * b[:, None]).reshape(groups, in_ch // groups, out_per_group).sum(1)
        shift = shift.reshape(-1)
    else:
        out_ch, in_per_group = w.shape[0], w.shape[1]
        view = (
            scale.reshape(groups, 1, in_per_group)
            .expand(groups, out_ch // groups, -1)
            .reshape(out_ch, in_per_group, *([1] * (w.dim() - 2)))
        )
        tap_sum = _tap_sums(w.reshape(out_ch, in_per_group, -1))
        # each output channel's kernel sums times its group's shifts: one batched product per group
        shift = torch.bmm(
            tap_sum.reshape(groups, out_ch // groups, in_per_group), b.reshape(groups, in_per_group, 1)
        ).reshape(out_ch)
    out_bias = torch.zeros_like(shift) if bias is None else bias.detach().double()
    # (the taps are summed before the weight is scaled, in place or not)
    new_w = w.mul_(view) if inplace and w.dtype == weight.dtype else w * view
    return new_w, out_bias + shift


def _tap_sums(taps: torch.Tensor) -> torch.Tensor:
    """The sums over the last dim (a kernel's taps) in float64; a 1x1 kernel's single tap as it is
    (a reduction that converts every element costs ten times the conversion alone)."""
    return taps[..., 0].double() if taps.shape[-1] == 1 else taps.sum(-1, dtype=torch.float64)


def identity_bn_params(
    mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` that make a BN with running stats ``(mean, var)`` the identity in eval."""
    return torch.sqrt(var.double() + eps), mean.double().clone()


@functools.lru_cache(maxsize=8)
def _hermite_nodes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights / weights.sum())


@functools.lru_cache(maxsize=8)
def _solving_nodes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hermite_nodes` less the far nodes whose weights are below 1e-18 (64 nodes: 44 kept): what
    they add to a moment is below float64's rounding of it, and each costs an evaluation of ``f``."""
    x, w = _hermite_nodes(n)
    kept = w >= 1e-18
    return x[kept].contiguous(), w[kept].contiguous()


def gaussian_moments(
    f: Activation, mean: torch.Tensor, std: torch.Tensor, *, nodes: int = 96
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E f(z)`` and ``Var f(z)`` for ``z ~ N(mean_c, std_c^2)``, per channel.

    Gauss–Hermite quadrature; ``f`` is called on a ``(nodes, C)`` float64
    tensor, so per-channel activations (PReLU) see channels on dim 1.
    """
    if mean.numel() > _CHUNK and _elementwise(f):
        m, v = _in_chunks(lambda a, b: gaussian_moments(f, a, b, nodes=nodes), mean, std)
        return m, v
    x, w = _hermite_nodes(nodes)
    z = mean.double()[None, :] + std.double().abs()[None, :] * x[:, None]
    y = f(z).double()  # z is read no more: an in-place f may write into it
    m = w @ y
    dev = y - m
    return m, (w @ dev.mul_(dev)).clamp_min(0.0)


#: channels a quadrature evaluates at once when its activation is elementwise: (nodes, 4096)
#: float64 tensors (2 MiB) stay in cache; a whole model's channels at once (efficientnet_b0's
#: 19,200 for SiLU) made each Newton step stream ten 10 MiB tensors through memory: 160 ms
#: against 85 ms in chunks, timed alternately in one process
_CHUNK = 4096


def _in_chunks(
    solve: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]], a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``solve`` on ``_CHUNK`` channels of ``a`` and ``b`` at a time, its results concatenated."""
    parts = [solve(a[i : i + _CHUNK], b[i : i + _CHUNK]) for i in range(0, a.numel(), _CHUNK)]
    return tuple(torch.cat(results) for results in zip(*parts, strict=True))


def _elementwise(f: Activation) -> bool:
    """Whether ``f`` on some channels equals ``f`` on all of them there (no per-channel parameters),
    so channels can be evaluated in any groups; checked on a small probe."""
    z = torch.linspace(-4.0, 4.0, 8 * 64, dtype=torch.float64).view(8, 64)
    with torch.no_grad():
        try:
            return bool(torch.equal(f(z.clone())[:, :32], f(z[:, :32].clone())))
        except (RuntimeError, ValueError, IndexError):
            return False


def match_gaussian(
    f: Activation,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    *,
    steps: int = 60,
    nodes: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find ``N(mu, sigma^2)`` per channel whose ``E f``, ``Var f`` hit the targets.

    Damped Newton (step 0.7) on ``(mu, l = log sigma)`` for the residuals
    ``r1 = (m - t_m) / sqrt(t_v)`` and ``r2 = (log v - log t_v) / 2``, where, with
    ``z_k = mu + sigma·x_k`` on Gauss–Hermite nodes ``x_k`` (weights ``w_k``),
    ``m = Σ w f(z)`` and ``v = Σ w (f(z) - m)²``. The Jacobian is closed form in ``f'``::

        dm/dmu = Σ w f'(z)            dm/dl = Σ w f'(z)·sigma·x
        dv/dmu = 2 Σ w (f(z) - m) f'(z)   dv/dl = 2 Σ w (f(z) - m) f'(z)·sigma·x

    (``Σ w (f - m) = 0`` drops the ``dm`` terms), so each step costs one evaluation of
    ``f`` and of its elementwise derivative (on ``nodes`` less those of negligible weight). Steps
    are damped (0.7) until both residuals are below 1e-3, then full (quadratic convergence).
    Channels are independent: one whose step has fallen below ``1e-10`` stops, the rest go on for
    at most ``steps`` steps; an elementwise ``f`` solves each distinct target once (`distinct_targets`),
    all of them in one Newton loop whose quadratures take ``_CHUNK`` channels at a time (a loop per
    chunk paid the last steps, a handful of channels each, once per chunk).
    Returns ``(mu, sigma, converged)``; channels that do not converge (targets
    outside what ``f`` can produce) are reported, not guessed.
    """
    if _elementwise(f):
        mu, sigma, ok = distinct_targets(
            lambda a, b: _match(f, a, b, steps, nodes, True), target_mean, target_var
        )
        return mu, sigma, ok
    return _match(f, target_mean, target_var, steps, nodes, False)


def distinct_targets(
    solve: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]], a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """``solve`` on each distinct pair ``(a_c, b_c)`` once, its results given to every channel that
    holds that pair (the BNs of a model never trained all hold the same statistics). Pairs are told
    apart by their values' ranks (1-D sorts: ``torch.unique(dim=0)`` takes 20 ms on 19,200 pairs)."""
    values_a, rank_a = torch.unique(a, return_inverse=True)
    values_b, rank_b = torch.unique(b, return_inverse=True)
    if max(values_a.numel(), values_b.numel()) == a.numel():
        return solve(a, b)  # every pair differs
    keys, inverse = torch.unique(rank_a * values_b.numel() + rank_b, return_inverse=True)
    first = torch.empty(keys.numel(), dtype=torch.long).scatter_(0, inverse, torch.arange(a.numel()))
    return tuple(t[inverse] for t in solve(a[first], b[first]))


#: ``(m, v, (dm/dmu, dm/dl), (dv/dmu, dv/dl))`` per channel at ``(mu, l = log sigma)``, for the
#: channels ``at`` (an index into all of them)
MomentsAt = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
]


def _match(
    f: Activation,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    steps: int,
    nodes: int,
    channelwise: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`match_gaussian` on one group of channels."""
    x, w = _solving_nodes(nodes)

    def moments(mu: torch.Tensor, log_s: torch.Tensor, at: torch.Tensor) -> Any:
        if channelwise:  # in chunks of channels: one Newton loop for all, its few last steps paid once
            m, v, dm_mu, dm_l, dv_mu, dv_l = _in_chunks(
                lambda a, b: _flat(_quadrature(f, a, b, x, w)), mu[at], log_s[at]
            )
            return m, v, (dm_mu, dm_l), (dv_mu, dv_l)
        # a per-channel f (PReLU) reads every channel on dim 1: all are evaluated, the active kept
        m, v, dm, dv = _quadrature(f, mu, log_s, x, w)
        return m[at], v[at], (dm[0][at], dm[1][at]), (dv[0][at], dv[1][at])

    return newton_match(
        moments, lambda mu, sigma: gaussian_moments(f, mu, sigma, nodes=nodes), target_mean, target_var, steps
    )


def newton_match(
    moments: MomentsAt,
    exact: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    steps: int = 60,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`match_gaussian`'s damped Newton iteration, for any way of taking the moments and their
    derivatives (``moments``; ``exact``: the moments the result is checked with)."""
    tm, tv = target_mean.double(), target_var.double().clamp_min(1e-12)
    mu = tm.clone()
    log_s = 0.5 * torch.log(tv)
    scale_m = tv.sqrt() + 1e-6
    active = torch.arange(tm.numel())
    for _ in range(steps):
        if active.numel() == 0:
            break
        d_mu, d_ls, r = _newton_update(*moments(mu, log_s, active), tm[active], tv[active], scale_m[active])
        # damped far from the solution, full Newton steps (quadratic convergence) close to it
        rate = torch.where(r < 1e-3, 1.0, 0.7)
        step_mu = torch.clamp(rate * d_mu, -2.0 * scale_m[active], 2.0 * scale_m[active])
        step_ls = (rate * d_ls).clamp(-1.0, 1.0)
        mu[active] -= step_mu
        log_s[active] -= step_ls
        active = active[(step_mu.abs() > 1e-10 * scale_m[active]) | (step_ls.abs() > 1e-10)]
    with torch.no_grad():
        m, v = exact(mu, torch.exp(log_s))
    converged = ((m - tm).abs() <= 1e-3 * (tv.sqrt() + 1e-3)) & ((v - tv).abs() <= 1e-2 * tv + 1e-8)
    return mu, torch.exp(log_s), converged


def _quadrature(
    f: Activation, mu: torch.Tensor, log_s: torch.Tensor, x: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``E f``, ``Var f`` and their derivatives in ``(mu, log sigma)`` by quadrature, per channel
    (the Jacobian of `match_gaussian`'s docstring)."""
    s = torch.exp(log_s)
    z = torch.addr(mu.expand(x.numel(), -1), x, s).requires_grad_(True)  # mu + x·s, (nodes, C)
    with torch.enable_grad():
        y = f(z.clone())  # a non-leaf input: an in-place activation may write into it
        (fp,) = torch.autograd.grad(y.sum(), z)
    y, fp = y.detach().double(), fp.double()
    # every sum over the nodes as a product with the weights w and w·x: Σ w·f', Σ w·x·f' in one
    # (2, nodes) @ (nodes, C), and Σ w·(f − m)·f', Σ w·x·(f − m)·f' in another
    m = w @ y
    dev = y - m
    v = w @ (dev * dev)
    both = torch.stack([w, w * x])
    grad_f = both @ fp
    grad_dev = both @ dev.mul_(fp)  # (f − m)·f' in place: the deviations are read no more
    return m, v, (grad_f[0], s * grad_f[1]), (2 * grad_dev[0], 2 * s * grad_dev[1])


def _flat(moments: Any) -> tuple[torch.Tensor, ...]:
    m, v, dm, dv = moments
    return (m, v, *dm, *dv)


def _newton_update(
    m: torch.Tensor,
    v: torch.Tensor,
    dm: tuple[torch.Tensor, torch.Tensor],
    dv: tuple[torch.Tensor, torch.Tensor],
    tm: torch.Tensor,
    tv: torch.Tensor,
    scale_m: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The undamped Newton step ``(d_mu, d_log_sigma)`` for the residuals ``r1 = (m − t_m) /
    scale`` and ``r2 = (log v − log t_v) / 2``, and the larger residual, per channel."""
    r1 = (m - tm) / scale_m
    r2 = 0.5 * (torch.log(v + 1e-12) - torch.log(tv))
    g1 = (dm[0] / scale_m, dm[1] / scale_m)
    g2 = (0.5 * dv[0] / (v + 1e-12), 0.5 * dv[1] / (v + 1e-12))
    det = g1[0] * g2[1] - g1[1] * g2[0]
    det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
    return (
        (g2[1] * r1 - g1[1] * r2) / det,
        (-g2[0] * r1 + g1[0] * r2) / det,
        torch.maximum(r1.abs(), r2.abs()),
    )

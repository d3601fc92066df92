"""The math of the approximate moves (method ``fit``): BN′'s parameters fitted per channel so the
moved block reproduces the old one on samples, and the moments BN′ then holds. Pure tensor math,
like `bnmove.core.bn_math`.

Samples are (K, C): K points per channel with weights w (K,) summing to 1 (Gauss–Hermite weights
data-free, 1/K for calibration data). Channels are independent throughout.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bn_math import Activation, _hermite_nodes


def gaussian_samples(
    mean: torch.Tensor, std: torch.Tensor, *, nodes: int = 96
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature points ``(K, C)`` and weights ``(K,)`` for ``z ~ N(mean_c, std_c^2)``."""
    x, w = _hermite_nodes(nodes)
    return mean.double()[None, :] + std.double().abs()[None, :] * x[:, None], w


def _wmean(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[:, None] * t).sum(0)


def fit_after(
    f: Activation, z: torch.Tensor, w: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best ``a', b'`` with ``a' f(z) + b' ≈ target`` per channel (weighted least squares).

    ``a' = Cov(y, f(z)) / Var f(z)``, ``b' = E y - a' E f(z)``. Returns
    ``(a', b', E f(z), Var f(z))``; the moments become BN''s running statistics.
    """
    fz = f(z.clone()).double()
    y = target.double()
    ef, ey = _wmean(fz, w), _wmean(y, w)
    var_f = _wmean((fz - ef) ** 2, w).clamp_min(0.0)
    cov = _wmean((y - ey) * (fz - ef), w)
    a = torch.where(var_f > 1e-12, cov / var_f.clamp_min(1e-12), torch.zeros_like(cov))
    return a, ey - a * ef, ef, var_f


def fit_before(
    f: Activation,
    z: torch.Tensor,
    w: torch.Tensor,
    target: torch.Tensor,
    init: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int = 40,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``a', b'`` with ``f(a' z + b') ≈ target`` per channel (non-linear least squares).

    Levenberg–Marquardt on the two parameters of every channel at once (the 2x2
    normal equations are solved in closed form), started from ``init`` and from
    ``(a, 0)``; each channel keeps the better result.
    """
    y = target.double()
    scale = _wmean((y - _wmean(y, w)) ** 2, w).clamp_min(1e-12)

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _wmean((f(a[None, :] * z + b[None, :]).double() - y) ** 2, w) / scale

    a_init, b_init = init[0].double(), init[1].double()
    best_a, best_b = a_init.clone(), b_init.clone()
    best_loss = torch.full_like(best_a, float("inf"))
    starts = [(a_init, b_init), (a_init, torch.zeros_like(b_init)), _grid_start(loss_of, a_init, z, w)]
    for a0, b0 in starts:
        a, b = a0.clone(), b0.clone()
        damping = torch.full_like(a, 1e-3)
        loss = loss_of(a, b)
        for _ in range(steps):
            u = (a[None, :] * z + b[None, :]).detach().requires_grad_(True)
            out = f(u).double()
            (slope,) = torch.autograd.grad(out.sum(), u)
            r = out.detach() - y
            ja, jb = slope * z, slope  # d out / d a, d out / d b
            g_a, g_b = _wmean(ja * r, w), _wmean(jb * r, w)
            h_aa, h_ab, h_bb = _wmean(ja * ja, w), _wmean(ja * jb, w), _wmean(jb * jb, w)
            h_aa = h_aa + damping * (h_aa + 1e-9)
            h_bb = h_bb + damping * (h_bb + 1e-9)
            det = (h_aa * h_bb - h_ab**2).clamp_min(1e-18)
            da = (h_bb * g_a - h_ab * g_b) / det
            db = (h_aa * g_b - h_ab * g_a) / det
            trial_a, trial_b = a - da, b - db
            trial = loss_of(trial_a, trial_b)
            better = trial < loss
            a = torch.where(better, trial_a, a)
            b = torch.where(better, trial_b, b)
            loss = torch.where(better, trial, loss)
            damping = torch.where(better, damping * 0.3, damping * 10.0).clamp(1e-9, 1e9)
        take = loss < best_loss
        best_a, best_b = torch.where(take, a, best_a), torch.where(take, b, best_b)
        best_loss = torch.where(take, loss, best_loss)
    return best_a, best_b


def _grid_start(
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    z: torch.Tensor,
    w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of a coarse grid of ``(a', b')`` per channel: a start that avoids poor local minima."""
    mean, var = weighted_moments(z, w)
    scale = a.abs().clamp_min(1e-3)
    best_a, best_b = a.clone(), torch.zeros_like(a)
    best = torch.full_like(a, float("inf"))
    for ka in (-4.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0):
        cand_a = ka * scale
        for kb in (-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
            # shift in units of the pre-activation's spread, around its mean
            cand_b = -cand_a * mean + kb * cand_a.abs() * var.sqrt()
            loss = loss_of(cand_a, cand_b)
            take = loss < best
            best_a, best_b = torch.where(take, cand_a, best_a), torch.where(take, cand_b, best_b)
            best = torch.where(take, loss, best)
    return best_a, best_b


def bn_params_for_affine(
    a: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of a BN with running stats ``(mean, var)`` whose eval map is ``a*u + b``."""
    weight = a.double() * torch.sqrt(var.double() + eps)
    return weight, b.double() + a.double() * mean.double()


def weighted_moments(z: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = _wmean(z.double(), w)
    return m, _wmean((z.double() - m) ** 2, w).clamp_min(0.0)


def relative_rmse(pred: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted RMS error of ``pred`` over the RMS spread of ``target``, across all channels."""
    err = _wmean((pred.double() - target.double()) ** 2, w).sum()
    spread = _wmean((target.double() - _wmean(target.double(), w)) ** 2, w).sum()
    return float(torch.sqrt(err / spread.clamp_min(1e-24)))

"""The rectified Gaussian in closed form: BN′'s statistics for ReLU without quadrature.

For ``z ~ N(mu, sigma²)`` and ``alpha = mu / sigma``, with ``Φ``, ``Q = 1 − Φ`` and ``φ`` the
standard normal's distribution, tail and density at ``alpha``::

    E relu(z)   = sigma · g(alpha),    g = alpha·Φ + φ
    Var relu(z) = sigma² · h(alpha),   h = alpha²·Φ·Q + Φ + alpha·φ·(Q − Φ) − φ²

(``h`` written so that nothing cancels where ``alpha`` is large, and in units of ``φ`` in the
far tail; ``g' = Φ``, ``h' = 2·g·Q``).
The ratio ``r = E / sqrt(Var) = g / sqrt(h)`` depends on ``alpha`` alone and grows with it, so
the Gaussian behind given statistics is one safeguarded Newton solve of ``log r`` in ``alpha``
per channel, then ``sigma = sqrt(Var / h)`` and ``mu = alpha·sigma``. Every channel with a
positive mean and variance has one (down to ``alpha = -20``, far below any float32 statistics).

Gauss–Hermite quadrature (``bn_math.gaussian_moments``) is exact for polynomials, not for the
kink at 0: with 96 nodes it misses ReLU's variance by up to 4% in the far tail, which the closed
form does not.
"""

from __future__ import annotations

import math

import torch

#: below this alpha the ReLU mean is under 1e-90 (float32 statistics hold nothing that small)
LOWEST_ALPHA = -20.0
#: above this alpha, relu(z) = z but with probability Q(alpha) < 1e-15: the Gaussian is the target
IDENTITY_ALPHA = 8.0


def _g_h(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``g``, ``h`` and their derivatives ``Φ``, ``2·g·Q`` at ``alpha``.

    Below 0 both are written in units of ``φ`` with the Mills ratio ``M = Φ/φ`` from the scaled
    ``erfcx``, so the far tail keeps its relative precision: ``g = φ·(alpha·M + 1)`` and
    ``h = φ·((alpha² + 1)·M + alpha − φ·(alpha·M + 1)²)``."""
    root2 = math.sqrt(2.0)
    pdf = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
    mills = math.sqrt(math.pi / 2.0) * torch.special.erfcx(-alpha.clamp_max(0.0) / root2)
    cdf = torch.where(alpha < 0, pdf * mills, 0.5 * torch.erfc(-alpha / root2))
    tail = 0.5 * torch.erfc(alpha / root2)
    g_direct = alpha * cdf + pdf
    h_direct = alpha * alpha * cdf * tail + cdf + alpha * pdf * (tail - cdf) - pdf * pdf
    unit_g = alpha * mills + 1.0
    h_tail = pdf * ((alpha * alpha + 1.0) * mills + alpha - pdf * unit_g * unit_g)
    g = torch.where(alpha < 0, pdf * unit_g, g_direct)
    h = torch.where(alpha < 0, h_tail, h_direct)
    return g, h.clamp_min(0.0), cdf, 2.0 * g * tail


def relu_moments(mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``E relu(z)`` and ``Var relu(z)`` for ``z ~ N(mean_c, std_c²)``, per channel, in float64."""
    mu, sigma = mean.double(), std.double().abs()
    positive = sigma > 0
    alpha = torch.where(positive, mu / torch.where(positive, sigma, 1.0), 0.0)
    g, h, _, _ = _g_h(alpha)
    return torch.where(positive, sigma * g, mu.clamp_min(0.0)), torch.where(positive, sigma * sigma * h, 0.0)


def match_relu(
    target_mean: torch.Tensor, target_var: torch.Tensor, *, steps: int = 60
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``N(mu, sigma²)`` per channel whose image under ReLU has the target mean and variance.

    Returns ``(mu, sigma, solved)``; a channel with a mean or variance that is not positive (no
    Gaussian's ReLU has it), or one below ``LOWEST_ALPHA``, is reported unsolved."""
    tm, tv = target_mean.double(), target_var.double()
    reachable = (tm > 0) & (tv > 0)
    log_r = torch.log(torch.where(reachable, tm, 1.0)) - 0.5 * torch.log(torch.where(reachable, tv, 1.0))
    lo = torch.full_like(tm, LOWEST_ALPHA)
    hi = torch.full_like(tm, IDENTITY_ALPHA)
    identity = reachable & (_residual(hi, log_r) <= 0)  # relu passes the Gaussian through
    solvable = reachable & ~identity & (_residual(lo, log_r) < 0)
    alpha = torch.clamp(torch.exp(log_r) - 1.0, LOWEST_ALPHA, IDENTITY_ALPHA)  # r ≈ alpha + 1 near 0
    for _ in range(steps):
        g, h, dg, dh = _g_h(alpha)
        residual = torch.log(g) - 0.5 * torch.log(h) - log_r
        newton = alpha - residual / (dg / g - 0.5 * dh / h)
        # a step below the rounding of log r itself (the far tail's) changes nothing either
        settled = (residual.abs() <= 1e-12) | ((newton - alpha).abs() <= 1e-12 * (1.0 + alpha.abs()))
        if bool((settled | ~solvable).all()):
            break
        lo = torch.where(residual < 0, alpha, lo)
        hi = torch.where(residual > 0, alpha, hi)
        inside = (newton >= lo) & (newton <= hi) & torch.isfinite(newton)
        alpha = torch.where(inside, newton, 0.5 * (lo + hi))  # bisect where Newton leaves the bracket
    solved = identity | (solvable & (_residual(alpha, log_r).abs() <= 1e-9))
    _, h, _, _ = _g_h(alpha)
    sigma = torch.where(identity, torch.sqrt(tv), torch.sqrt(tv / torch.where(h > 0, h, 1.0)))
    mu = torch.where(identity, tm, alpha * sigma)
    return torch.where(solved, mu, 0.0), torch.where(solved, sigma, 1.0), solved


def _residual(alpha: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """``log r(alpha) − log r``: negative below the solution, positive above it."""
    g, h, _, _ = _g_h(alpha)
    return torch.log(g) - 0.5 * torch.log(h) - log_r


__all__ = ["match_relu", "relu_moments"]

"""Gaussian moments of piecewise-polynomial activations in closed form (ReLU6, Hardtanh,
LeakyReLU, Hardswish, Hardsigmoid): BN′'s statistics for them without quadrature.

An activation is a list of pieces ``[a, b)`` on each of which it is a polynomial of degree at
most 2 (``c0 + c1·z + c2·z²``), continuous where the pieces meet. For ``z ~ N(mu, sigma²)`` and
``u = (z − mu)/sigma``, the standard normal's partial moments over ``[alpha, beta]`` are::

    M0 = Φ(beta) − Φ(alpha),   M1 = φ(alpha) − φ(beta),
    Mj = (j − 1)·M(j−2) + alpha^(j−1)·φ(alpha) − beta^(j−1)·φ(beta)

and ``E[z^j; a ≤ z < b] = Σ_i C(j, i)·mu^(j−i)·sigma^i·Mi``. ``E f`` and ``E f²`` are sums of
these over the pieces; for a continuous piecewise ``g``, ``dE g/dmu = E g'`` and
``dE g/d(log sigma) = E[g'·(z − mu)]``, sums of the same kind. So the Newton solve for BN′
before ``f`` (`bnmove.core.bn_math.newton_match`) costs a few operations per channel and
step instead of a quadrature over 64 nodes, and is exact where quadrature is not: Gauss–Hermite
is exact for polynomials, not at the kinks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from . import bn_math

#: ``(a, b, (c0, c1, c2))``: the polynomial ``c0 + c1·z + c2·z²`` on ``[a, b)``
Piece = tuple[float, float, tuple[float, ...]]

_INF = math.inf


def clipped(low: float, high: float) -> list[Piece]:
    """``min(max(z, low), high)``: ReLU6 is ``clipped(0, 6)``, Hardtanh its own bounds."""
    return [(-_INF, low, (low,)), (low, high, (0.0, 1.0)), (high, _INF, (high,))]


def leaky(slope: float) -> list[Piece]:
    """``z`` above 0, ``slope·z`` below (ReLU: slope 0)."""
    return [(-_INF, 0.0, (0.0, slope)), (0.0, _INF, (0.0, 1.0))]


#: ``z·relu6(z + 3)/6``
HARDSWISH: list[Piece] = [(-_INF, -3.0, (0.0,)), (-3.0, 3.0, (0.0, 0.5, 1.0 / 6.0)), (3.0, _INF, (0.0, 1.0))]
#: ``relu6(z + 3)/6``
HARDSIGMOID: list[Piece] = [(-_INF, -3.0, (0.0,)), (-3.0, 3.0, (0.5, 1.0 / 6.0)), (3.0, _INF, (1.0,))]


def _mul(p: Sequence[float], q: Sequence[float]) -> tuple[float, ...]:
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return tuple(out)


def _derivative(p: Sequence[float]) -> tuple[float, ...]:
    return tuple(i * c for i, c in enumerate(p))[1:] or (0.0,)


class _Pieces:
    """The pieces as tensors: their bounds ``(P,)``, and the coefficients ``(6, P, 5)`` of the six
    polynomials whose expectations a Newton step needs: ``f``, ``f²``, ``f'``, ``f'·z``, ``(f²)'``
    and ``(f²)'·z`` (degree at most 4)."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        self.low = torch.tensor([a for a, _, _ in pieces], dtype=torch.float64)
        self.high = torch.tensor([b for _, b, _ in pieces], dtype=torch.float64)
        rows = []
        for _, _, f in pieces:
            slope, square = _derivative(f), _mul(f, f)
            square_slope = _mul((2.0,), _mul(f, slope))
            families = (
                f,
                square,
                slope,
                _mul((0.0, 1.0), slope),
                square_slope,
                _mul((0.0, 1.0), square_slope),
            )
            rows.append([list(q) + [0.0] * (5 - len(q)) for q in families])
        self.coefficients = torch.tensor(rows, dtype=torch.float64).permute(1, 0, 2).contiguous()  # (6, P, 5)

    def expectations(self, mu: torch.Tensor, sigma: torch.Tensor, families: int = 6) -> torch.Tensor:
        """``E q(z)`` over the pieces for the first ``families`` polynomials, ``(families, C)``."""
        alpha = (self.low[:, None] - mu) / sigma  # (P, C)
        beta = (self.high[:, None] - mu) / sigma
        root2 = math.sqrt(2.0)
        # Φ(beta) − Φ(alpha), from the tail where both lie in it (no cancellation far right)
        upper = 0.5 * (torch.erfc(alpha / root2) - torch.erfc(beta / root2))
        lower = 0.5 * (torch.erfc(-beta / root2) - torch.erfc(-alpha / root2))
        (a, pdf_a), (b, pdf_b) = _tail(alpha), _tail(beta)
        partial = [torch.where(alpha > 0, upper, lower), pdf_a - pdf_b]
        for j in range(2, 5):  # M_j = (j − 1)·M_(j−2) + alpha^(j−1)·φ(alpha) − beta^(j−1)·φ(beta)
            partial.append((j - 1) * partial[j - 2] + a ** (j - 1) * pdf_a - b ** (j - 1) * pdf_b)
        # E[z^j; piece] = Σ_i C(j, i)·mu^(j−i)·sigma^i·M_i, (P, 5, C) with j on dim 1
        sigma_i = [sigma**i * partial[i] for i in range(5)]
        mu_k = [torch.ones_like(mu), mu, mu * mu, mu**3, mu**4]
        raw = torch.stack([_binomial_sum(j, mu_k, sigma_i) for j in range(5)], 1)
        pieces = self.coefficients.shape[1]
        flat = self.coefficients[:families].reshape(families, pieces * 5)  # (families, P·5)
        return flat @ raw.reshape(pieces * 5, -1)


def _tail(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` with ±∞ as 0, and ``φ(t)`` (0 at ±∞): ``t^k·φ(t)`` is then 0 at ±∞ too."""
    finite = torch.isfinite(t)
    safe = torch.where(finite, t, 0.0)
    return safe, torch.where(finite, torch.exp(-0.5 * safe * safe) / math.sqrt(2.0 * math.pi), 0.0)


def _binomial_sum(j: int, mu_k: list[torch.Tensor], sigma_i: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_i C(j, i)·mu^(j−i)·sigma^i·M_i``."""
    total = mu_k[j] * sigma_i[0]
    for i in range(1, j + 1):
        total = total + math.comb(j, i) * mu_k[j - i] * sigma_i[i]
    return total


def moments(
    pieces: Sequence[Piece], mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``E f(z)`` and ``Var f(z)`` for ``z ~ N(mean_c, std_c²)``, per channel, in float64."""
    mu, sigma = mean.double(), std.double().abs().clamp_min(1e-300)
    m, second = _Pieces(pieces).expectations(mu, sigma, families=2)
    return m, (second - m * m).clamp_min(0.0)


def _with_derivatives(table: _Pieces, mu: torch.Tensor, log_s: torch.Tensor) -> Any:
    """``(m, v, (dm/dmu, dm/dl), (dv/dmu, dv/dl))`` with ``l = log sigma``: ``dE g/dmu = E g'``,
    ``dE g/dl = E[g'·z] − mu·E g'``."""
    m, second, slope, slope_z, square_slope, square_slope_z = table.expectations(mu, torch.exp(log_s))
    dm = (slope, slope_z - mu * slope)
    d_second = (square_slope, square_slope_z - mu * square_slope)
    v = (second - m * m).clamp_min(0.0)
    return m, v, dm, (d_second[0] - 2 * m * dm[0], d_second[1] - 2 * m * dm[1])


def match(
    pieces: Sequence[Piece], target_mean: torch.Tensor, target_var: torch.Tensor, *, steps: int = 60
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``N(mu, sigma²)`` per channel whose image under the piecewise ``f`` has the targets'
    mean and variance: `bnmove.core.bn_math.match_gaussian`'s Newton iteration on the closed-form
    moments. Returns ``(mu, sigma, converged)``."""

    table = _Pieces(pieces)

    def at(mu: torch.Tensor, log_s: torch.Tensor, active: torch.Tensor) -> Any:
        return _with_derivatives(table, mu[active], log_s[active])

    mu, sigma, ok = bn_math.distinct_targets(
        lambda tm, tv: bn_math.newton_match(at, lambda mu, sigma: moments(pieces, mu, sigma), tm, tv, steps),
        target_mean,
        target_var,
    )
    return mu, sigma, ok


__all__ = ["HARDSIGMOID", "HARDSWISH", "Piece", "clipped", "leaky", "match", "moments"]

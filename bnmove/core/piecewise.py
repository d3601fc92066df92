"""Gaussian moments of piecewise-polynomial activations in closed form (ReLU6, Hardtanh,
LeakyReLU, Hardswish, Hardsigmoid): BN′'s statistics for them without quadrature.

An activation is a list of pieces ``[a, b)`` on each of which it is a polynomial of degree at
most 2 (``c0 + c1·z + c2·z²``), continuous where the pieces meet. For ``z ~ N(mu, sigma²)`` and
``alpha = (a − mu)/sigma``, ``beta = (b − mu)/sigma``, the partial moments ``Ij = E[z^j; a ≤ z < b]``
follow from Stein's identity ``E[(z − mu)·g(z)] = sigma²·E g'(z)`` on the piece::

    I0 = Φ(beta) − Φ(alpha),   I1 = mu·I0 + sigma·(φ(alpha) − φ(beta)),
    Ij = mu·I(j−1) + (j − 1)·sigma²·I(j−2) + sigma·(a^(j−1)·φ(alpha) − b^(j−1)·φ(beta))

(an infinite bound's term is 0). ``E f`` and ``E f²`` are sums of
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
    and ``(f²)'·z`` (degree at most 4). A piece where ``f`` is 0 adds nothing to any of them and
    is left out (ReLU6's, Hardswish's and Hardsigmoid's left piece: a third of the work)."""

    def __init__(self, pieces: Sequence[Piece]) -> None:
        pieces = [piece for piece in pieces if any(c != 0.0 for c in piece[2])] or list(pieces[:1])
        self.low = torch.tensor([a for a, _, _ in pieces], dtype=torch.float64)
        self.high = torch.tensor([b for _, b, _ in pieces], dtype=torch.float64)
        finite_low = torch.where(torch.isfinite(self.low), self.low, 0.0)[:, None]
        finite_high = torch.where(torch.isfinite(self.high), self.high, 0.0)[:, None]
        #: each finite bound to the powers 1, 2, 3 the recurrence multiplies ``sigma·φ`` by
        self.low_powers = [finite_low**k for k in (1, 2, 3)]
        self.high_powers = [finite_high**k for k in (1, 2, 3)]
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
        # Φ(beta) − Φ(alpha), from the tail where both lie in it (no cancellation far right):
        # ½(erfc(a/√2) − erfc(b/√2)) right of 0, ½(erfc(−b/√2) − erfc(−a/√2)) left of it, both as
        # ½·s·(erfc(s·a/√2) − erfc(s·b/√2)) with s = ±1 (the same numbers, two erfc calls, not four)
        side = torch.where(alpha > 0, 1.0, -1.0)
        mass = 0.5 * side * (torch.erfc(alpha / root2 * side) - torch.erfc(beta / root2 * side))
        # sigma·φ at each bound (0 at an infinite one, where the bound itself is taken as 0)
        at_low = sigma * torch.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
        at_high = sigma * torch.exp(-0.5 * beta * beta) / math.sqrt(2.0 * math.pi)
        var = sigma * sigma
        raw = [mass]
        raw.append(mu * raw[0] + at_low - at_high)
        for j in range(2, 5):
            raw.append(
                mu * raw[j - 1]
                + (j - 1) * var * raw[j - 2]
                + self.low_powers[j - 2] * at_low
                - self.high_powers[j - 2] * at_high
            )
        pieces = self.coefficients.shape[1]
        flat = self.coefficients[:families].reshape(families, pieces * 5)  # (families, P·5)
        return flat @ torch.stack(raw, 1).reshape(pieces * 5, -1)  # raw: (P, 5, C), j on dim 1


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

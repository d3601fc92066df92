"""How much a timing ratio can be trusted on the machine that measured it.

Timings on a shared CPU move by tens of percent between runs (two sessions of one graph read
0.86–3.5x in single short runs on a busy machine). ``compare`` therefore times, in the same
interleaved rounds as the variants, a second session of a byte-identical copy of the reference:
its ratio to the reference is the run's *noise floor*, the ratio two identical graphs show here
and now. Every ratio comes with a 95% interval over the rounds, and a difference smaller than the
floor's spread is not a difference this run can see.

The ratio is ``median(variant) / median(reference)`` over the rounds (the statistic the table
shows); its interval is a percentile bootstrap over rounds, resampled in pairs (a round's
variant and reference runs were timed side by side, and share that moment's load).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: bootstrap resamples per interval (the percentiles settle to about 0.5% of the ratio)
RESAMPLES = 2000


@dataclass(frozen=True)
class RatioInterval:
    """A ratio of median latencies and its 95% interval over the timed rounds."""

    ratio: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def ratio_interval(variant: Sequence[float], reference: Sequence[float], *, seed: int = 0) -> RatioInterval:
    """``median(variant) / median(reference)`` with a 95% percentile-bootstrap interval, resampling
    the rounds in pairs (``variant[i]`` and ``reference[i]`` were timed in the same round)."""
    v, r = np.asarray(variant, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if v.shape != r.shape or v.size == 0:
        raise ValueError("one variant and one reference time per round, at least one round")
    ratio = float(np.median(v) / np.median(r))
    if v.size < 3:  # no spread to speak of
        return RatioInterval(ratio, ratio, ratio)
    rounds = np.random.default_rng(seed).integers(0, v.size, size=(RESAMPLES, v.size))
    ratios = np.median(v[rounds], axis=1) / np.median(r[rounds], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return RatioInterval(ratio, float(min(low, ratio)), float(max(high, ratio)))


def too_noisy(floor: RatioInterval, ratios: Sequence[RatioInterval]) -> bool:
    """Whether the noise floor is as wide as every difference measured: two identical graphs moved
    at least as far from 1 as the variant furthest from the reference."""
    spread = max(abs(floor.high - 1.0), abs(1.0 - floor.low), abs(floor.ratio - 1.0))
    furthest = max((abs(r.ratio - 1.0) for r in ratios), default=0.0)
    return bool(ratios) and spread >= furthest


__all__ = ["RatioInterval", "ratio_interval", "too_noisy"]

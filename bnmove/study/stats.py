"""The statistics of a placement study: paired differences between placements, with intervals.

Runs with the same seed share their initialisation (and, in bnmove's loop, their batch order),
so placements are compared by the difference per seed, ``d_i = m_b,i − m_a,i``: mean ``d̄``,
standard error ``s_d/√n``, 95% interval ``d̄ ± t_{0.975, n−1} · s_d/√n``; with one seed
no interval can be given. One code path serves bnmove's own training loop, a
Python ``train=`` callable and a ``--run`` command: only where the metric comes from differs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

#: two-sided 95% quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (scipy's where installed;
    else the table, rounding ``df`` down, which errs toward wider intervals)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.960


@dataclass(frozen=True)
class Metric:
    """What a study compares: a metric's name, which direction is better, and how to show it
    (``percent``: a fraction shown in percent, its differences in points)."""

    name: str = "val_accuracy"
    higher_is_better: bool = True
    percent: bool = True

    def value(self, fraction: float) -> str:
        return f"{fraction:.1%}" if self.percent else f"{fraction:.4g}"

    def amount(self, difference: float, signed: bool = False) -> str:
        """A difference: ``3.3 points`` for percentages, ``0.0123`` otherwise."""
        if self.percent:
            return f"{_points(difference):{'+' if signed else ''}.1f}" + ("" if signed else " points")
        return f"{difference + 0.0:{'+' if signed else ''}.3g}"


ACCURACY = Metric()


@dataclass(frozen=True)
class PairedDifference:
    """The metric of ``b`` minus that of ``a``, paired by seed (same initialisation)."""

    a: str
    b: str
    differences: list[float]
    mean: float
    #: 95% confidence interval of the mean (Student t over seeds); None with a single seed
    low: float | None
    high: float | None
    metric: Metric = ACCURACY

    @property
    def seeds(self) -> int:
        return len(self.differences)

    def verdict(self) -> str:
        """One line: which placement is better and by how much, or that no difference is detectable."""
        m = self.metric
        if self.low is None or self.high is None:
            return (
                f"{self.b} vs {self.a}: {m.amount(self.mean, signed=True)}"
                f"{' points' if m.percent else f' {m.name}'} on one seed; "
                "no interval without more seeds (--seeds 3 or more)"
            )
        few = "; too few seeds for a reliable interval" if self.seeds < 3 else ""
        if self.low > 0 or self.high < 0:  # the interval excludes zero: name the better placement
            sign = 1 if self.mean > 0 else -1
            b_better = sign > 0 if m.higher_is_better else sign < 0
            better, worse = (self.b, self.a) if b_better else (self.a, self.b)
            low, high = sorted((sign * self.low, sign * self.high))
            on = "" if m.percent or m.name == ACCURACY.name else f" on {m.name}"
            return (
                f"{better} is better than {worse}{on} by {m.amount(abs(self.mean))} "
                f"(95% CI {_plain(m, low)} to {_plain(m, high)}, {self.seeds} seeds){few}"
            )
        return (
            f"no detectable difference between {self.a} and {self.b} ({self.b} − {self.a}"
            f"{'' if m.percent else f' {m.name}'}: 95% CI {m.amount(self.low, signed=True)} to "
            f"{m.amount(self.high, signed=True)}, {self.seeds} seeds){few}"
        )


def _plain(metric: Metric, value: float) -> str:
    return f"{_points(value):.1f}" if metric.percent else f"{value + 0.0:.3g}"


def _points(fraction: float) -> float:
    """Accuracy fraction -> points, rounded to 0.1 without a negative zero."""
    return round(100 * fraction, 1) + 0.0


def paired_difference(
    a: str, b: str, values: dict[str, dict[int, float]], metric: Metric = ACCURACY
) -> PairedDifference:
    """``b - a`` per seed both ran, with its mean and 95% t interval."""
    seeds = sorted(set(values[a]) & set(values[b]))
    diffs = [values[b][s] - values[a][s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(a, b, diffs, mean, None, None, metric)
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(a, b, diffs, mean, mean - half, mean + half, metric)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def chance_level(labels: list[int] | None, classes: int) -> float:
    """The accuracy of always answering the most common validation class (1/classes without labels)."""
    if not labels:
        return 1.0 / max(classes, 1)
    return max(labels.count(c) for c in set(labels)) / len(labels)


def at_chance(accuracies: list[float], chance: float, samples: int) -> bool:
    """Every accuracy within two binomial standard errors (at least one point) of chance."""
    margin = max(0.01, 2 * math.sqrt(chance * (1 - chance) / max(samples, 1)))
    return bool(accuracies) and all(acc <= chance + margin for acc in accuracies)

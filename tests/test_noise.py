"""A timing ratio's interval and the run's noise floor, on hand-made rounds (bnmove.deploy.noise)."""

from __future__ import annotations

import numpy as np
import pytest

from bnmove.deploy.comparison import Comparison, Timing
from bnmove.deploy.noise import RatioInterval, ratio_interval, too_noisy
from bnmove.report import noise_lines


def _rounds(n: int, scale: float, jitter: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(scale * (1.0 + jitter * rng.standard_normal(n)))


def test_identical_rounds_read_exactly_one() -> None:
    times = _rounds(40, 1e-3, 0.05, 0)
    assert ratio_interval(times, times) == RatioInterval(1.0, 1.0, 1.0)


def test_a_variant_twice_as_slow_reads_two_with_a_narrow_interval() -> None:
    reference = _rounds(60, 1e-3, 0.02, 1)
    measured = ratio_interval([2 * t for t in _rounds(60, 1e-3, 0.02, 2)], reference)
    assert measured.ratio == pytest.approx(2.0, rel=0.02)
    assert measured.contains(measured.ratio) and 1.9 < measured.low <= measured.high < 2.1


def test_two_samples_of_one_distribution_on_a_noisy_machine_contain_one() -> None:
    """Same graph, heavy noise (a busy machine): the ratio wanders, its interval covers 1."""
    a, b = _rounds(50, 1e-3, 0.3, 3), _rounds(50, 1e-3, 0.3, 4)
    measured = ratio_interval(a, b)
    assert measured.low < 1.0 < measured.high and measured.high - measured.low > 0.1


def test_rounds_are_resampled_in_pairs() -> None:
    """A load spike hits the variant and the reference of the same round: pairing cancels it."""
    spikes = np.where(np.arange(50) % 5 == 0, 8.0, 1.0)
    reference = list(1e-3 * spikes)
    measured = ratio_interval([1.2 * t for t in reference], reference)
    assert measured.ratio == pytest.approx(1.2) and measured.high - measured.low < 0.05


def test_the_machine_is_too_noisy_when_the_floor_is_as_wide_as_every_difference() -> None:
    floor = RatioInterval(1.02, 0.90, 1.12)
    assert too_noisy(floor, [RatioInterval(1.05, 0.95, 1.2)])  # 5% inside a ±12% floor
    assert not too_noisy(floor, [RatioInterval(1.05, 0.95, 1.2), RatioInterval(1.5, 1.4, 1.6)])
    assert not too_noisy(floor, [])
    with pytest.raises(ValueError):
        ratio_interval([1.0, 2.0], [1.0])


def _comparison(after: float, floor: RatioInterval) -> Comparison:
    def timing(name: str, ratio: float, low: float, high: float) -> Timing:
        return Timing(name, 1, 50, ratio, ratio, ratio, ratio, 1 / ratio, ratio, low, high)

    return Comparison(
        "cpu",
        "cpu",
        "1",
        "now",
        "original",
        [],
        [timing("original", 1.0, 1.0, 1.0), timing("after", after, after - 0.02, after + 0.02)],
        [],
        [1],
        noise_floor={1: floor},
    )


def test_the_report_gives_each_interval_the_floor_and_the_warning() -> None:
    quiet = _comparison(1.30, RatioInterval(1.0, 0.98, 1.03))
    lines = noise_lines(quiet)
    assert lines == [
        "batch 1, 95% intervals over 50 rounds: after 1.28–1.32×; noise floor (the 'original' file "
        "timed again in the same rounds) 1.00× (0.98–1.03×)"
    ]
    assert quiet.to_dict()["noise_floor"] == [
        {"batch_size": 1, "ratio": 1.0, "low": 0.98, "high": 1.03, "too_noisy": False}
    ]
    busy = _comparison(1.10, RatioInterval(1.2, 0.8, 1.6))
    assert busy.too_noisy(1) and noise_lines(busy)[1].startswith(
        "the machine is too noisy to separate these variants at batch 1: one graph timed twice read 0.80–1.60×"
    )

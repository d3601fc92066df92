"""bnmove's loop chooses its CPU threads by measuring a training step (bnmove.study.threads)."""

from __future__ import annotations

import pytest
import torch

import bnmove
from bnmove.study.data import load_dataset
from bnmove.study.experiment import experiment
from bnmove.study.threads import choose_threads


class _Clock:
    """A hand-made timer: a step costs what the current thread count costs on this 'machine'."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.now, self.cost, self.steps = 0.0, cost, 0

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.cost[torch.get_num_threads()]
        self.steps += 1


@pytest.mark.parametrize(
    ("cost", "chosen"),
    [
        ({1: 0.010, 4: 0.080}, 1),  # busy cores: four threads spin and wait for each other
        ({1: 0.040, 4: 0.012}, 4),  # idle cores, a large model: all of them
        ({1: 0.020, 4: 0.020}, 1),  # a tie: one thread (it leaves the others to the machine)
        ({1: 0.020, 4: 0.019}, 1),  # 5% faster: within noise, one thread
    ],
    ids=["busy", "idle", "tie", "within-noise"],
)
def test_the_faster_thread_count_is_chosen(cost: dict[int, float], chosen: int) -> None:
    before = torch.get_num_threads()
    clock = _Clock(cost)
    choice = choose_threads(clock.step, 4, repeats=3, timer=clock)
    assert choice.threads == chosen and choice.seconds == pytest.approx(cost)
    assert clock.steps == 2 + 2 * 3  # a warm-up each, then interleaved
    assert torch.get_num_threads() == before  # measuring changes nothing
    assert f"{chosen} of 4 threads" in choice.describe()


def test_one_core_has_nothing_to_choose() -> None:
    choice = choose_threads(lambda: pytest.fail("no step on one core"), 1)
    assert choice.threads == 1 and choice.describe() == "1 thread, the only core"


def test_the_study_uses_the_threads_given_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    result = experiment(
        bnmove.sample_models.digits_net(),
        load_dataset("digits"),
        epochs=1,
        seeds=1,
        device="cpu",
        threads=1,
        on_epoch=lambda *a: seen.append(torch.get_num_threads()),
    )
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert "threads: 1 threads, as given" in result.notes
    measured = experiment(
        bnmove.sample_models.digits_net(), load_dataset("digits"), epochs=1, seeds=1, device="cpu"
    )
    assert any(n.startswith("threads: ") and "the faster training step" in n for n in measured.notes)

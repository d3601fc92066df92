"""bnmove's loop chooses its CPU threads by measuring a training step (bnmove.study.threads)."""

from __future__ import annotations

import pytest
import torch

import bnmove
from bnmove.study import EpochRecord, Execution, Training
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
    choice = choose_threads(clock.step, 4, repeats=3, timer=clock, busy=lambda: 0.0)
    assert choice.threads == chosen and choice.seconds == pytest.approx(cost)
    rounds = 2 if max(cost.values()) > 3 * min(cost.values()) else 3  # 3x the other: no noise, stop
    assert clock.steps == 2 + 2 * rounds  # a warm-up each, then interleaved
    assert torch.get_num_threads() == before  # measuring changes nothing
    assert f"{chosen} of 4 threads" in choice.describe()


def test_on_busy_cores_one_thread_is_chosen_without_timing_threads_that_would_wait() -> None:
    choice = choose_threads(lambda: pytest.fail("nothing to time beside other work"), 4, busy=lambda: 1.6)
    assert choice.threads == 1 and choice.busy == 1.6
    assert choice.describe().startswith("1 thread: 1.6 of ") and "busy with other work" in choice.describe()
    quiet = choose_threads(lambda: None, 4, busy=lambda: 0.2, repeats=1)  # a fifth of a core: timed
    assert set(quiet.seconds) == {1, 4}


def test_busy_cores_reads_the_machine() -> None:
    from bnmove.core.threads import busy_cores

    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= (__import__("os").cpu_count() or 1)


def test_one_core_has_nothing_to_choose() -> None:
    choice = choose_threads(lambda: pytest.fail("no step on one core"), 1)
    assert choice.threads == 1 and choice.describe() == "1 thread, the only core"


def test_the_study_uses_the_threads_given_and_restores_the_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    result = experiment(
        bnmove.sample_models.digits_net(),
        load_dataset("digits"),
        seeds=1,
        on_progress=lambda e: seen.append(torch.get_num_threads()) if isinstance(e, EpochRecord) else None,
        training=Training(epochs=1, threads=1),
        execution=Execution(device="cpu"),
    )
    assert seen == [1, 1] and torch.get_num_threads() == before
    assert "threads: 1 thread, as given" in result.notes
    measured = experiment(
        bnmove.sample_models.digits_net(),
        load_dataset("digits"),
        seeds=1,
        training=Training(epochs=1),
        execution=Execution(device="cpu"),
    )
    chosen = [n for n in measured.notes if n.startswith("threads: ")]
    assert len(chosen) == 1 and measured.threads == chosen[0].removeprefix("threads: ")
    assert any(
        why in chosen[0] for why in ("the faster training step", "busy with other work", "the only core")
    )


def test_compare_on_the_cpu_picks_threads_per_batch_size_and_takes_threads_when_given(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from click.testing import CliRunner
    from zoo import build

    from bnmove.cli import main
    from bnmove.core.threads import available_cores
    from bnmove.deploy import runtime
    from bnmove.deploy.export import ExportOptions, export_variants

    model, inputs = build("resnet")
    export_variants(model, inputs, tmp_path, ("original",), stem="net", options=ExportOptions())
    result = runtime.compare([tmp_path], provider="cpu", batch_sizes=(1, 4), warmup=1, iterations=3)
    cores = available_cores()
    assert set(result.threads) == {1, 4}
    for choice in result.threads.values():
        assert choice.threads in (1, cores)
        if choice.busy is None:  # (on busy cores, one thread without timing)
            assert set(choice.seconds) == ({1, cores} if cores > 1 else {1})  # both counts were timed
    assert "onnxruntime CPU threads for the timings: batch 1: " in "\n".join(
        bnmove.report.provider_lines(result)
    )
    given = CliRunner().invoke(
        main, ["compare", str(tmp_path), "--provider", "cpu", "--iterations", "2", "--batch-sizes", "1",
               "--threads", "1", "--json"],
    )  # fmt: skip
    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout)["threads"] == [
        {"batch_size": 1, "threads": 1, "chosen": "1 thread, as given"}
    ]


def test_the_general_rule_keeps_every_core_only_when_clearly_faster() -> None:
    from bnmove.core.threads import faster_count

    now = [0.0]

    def costs(seconds: float):  # type: ignore[no-untyped-def]
        def run() -> None:
            now[0] += seconds

        return run

    timer = lambda: now[0]  # noqa: E731
    assert faster_count({1: costs(0.010), 8: costs(0.004)}, timer=timer, step="run").threads == 8
    slow = faster_count({1: costs(0.010), 8: costs(0.0095)}, timer=timer, step="run")
    assert slow.threads == 1 and slow.seconds == pytest.approx({1: 0.010, 8: 0.0095})
    assert "the faster run (mean 1: 10.00 ms, 8: 9.50 ms)" in slow.describe()

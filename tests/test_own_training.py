"""The placement study around the user's own training: a command (--run) or a callable (train=).

Results must equal running the script by hand, runs pair by seed through the same code as
bnmove's loop, a failing run is one clear line, finished runs stay, and re-runs never redo work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from output import messages
from rich.console import Console
from torch import nn

import bnmove
from bnmove.cli import main
from bnmove.io.loading import load_model
from bnmove.report import experiment_table
from bnmove.study import Execution, RunStarted, Training, runner
from bnmove.study.data import Dataset, Split
from bnmove.study.experiment import experiment
from bnmove.study.recipes import Recipe
from bnmove.study.runs import weights_digest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "01_your_own_training"

#: a stand-in for a training script: no training, numbers that say what it was given
FAKE_TRAIN = """
import json, sys, pathlib, torch
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
seed = int(args["--seed"])
root = pathlib.Path(args["--root"])
with open(root / "calls.log", "a") as log:
    log.write(f"{args['--variant']} {seed}\\n")
if (root / "FAIL").exists() and seed == 1:
    print("loading the data", file=sys.stderr)
    print("RuntimeError: CUDA out of memory", file=sys.stderr)
    sys.exit(3)
model = torch.load(args["--model"], weights_only=False)
total = float(sum(p.detach().double().sum() for p in model.parameters()))
print("epoch 1 done")
print(json.dumps({"score": total, "seed": seed, "after": int(args["--variant"] == "after"),
                  "on_cpu": int(args["--device"] == "cpu"), "flag": True}))
print("bye")
"""


class Tiny(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x))))


def _blobs(n: int = 120, noise_only: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + (0 if noise_only else F.one_hot(y, 6).float() * 2.5)
    return Dataset(Split(x[:90], y[:90]), Split(x[90:], y[90:]), "blobs")


def _fake_study(tmp_path: Path, *extra: str) -> list[str]:
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    model_file = tmp_path / "tiny.pt"  # torch classes only: the script can unpickle it anywhere
    torch.save(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)), model_file)
    command = (
        f"{sys.executable} {script} --model {{model}} --seed {{seed}} --variant {{variant}} "
        f"--device {{device}} --root {tmp_path}"
    )
    return ["experiment", str(model_file), "--allow-pickle", "--run", command, *extra]


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_run_command_equals_running_the_script_by_hand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's plain PyTorch train.py, two seeds, two jobs: each run's metrics are what the
    script gives when run by hand on the variant bnmove wrote, and the verdict pairs them."""
    out = tmp_path / "study"
    model_file = tmp_path / "net.pt"
    monkeypatch.syspath_prepend(str(EXAMPLE))  # --import net, here and in the runs
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLE))
    subprocess.run([sys.executable, str(EXAMPLE / "net.py")], cwd=tmp_path, check=True)
    command = (
        f"{sys.executable} {EXAMPLE / 'train.py'} --model {{model}} --seed {{seed}} --out {{out}} --epochs 1"
    )
    result = CliRunner().invoke(
        main,
        ["experiment", str(model_file), "--allow-pickle", "--import", "net", "--run", command,
         "--metric", "val_acc", "--seeds", "2", "--jobs", "2", "-o", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["metric"] == "val_acc" and payload["training"] == command
    per_run: dict[str, dict[int, float]] = {"before": {}, "after": {}}
    for variant in ("before", "after"):
        for seed in (0, 1):
            folder = out / "jobs" / f"{variant}-seed{seed}"
            assert f"--seed {seed} --out {folder}" in (folder / "command.txt").read_text()
            kept = payload["metrics"][f"{variant}/seed{seed}"]
            assert kept == json.loads((folder / "metrics.json").read_text())
            variant_model = torch.load(folder / "model.pt", weights_only=False)
            assert weights_digest(variant_model) == payload["start_digests"][f"{variant}/seed{seed}"]
            by_hand = tmp_path / f"by-hand-{variant}-{seed}"
            subprocess.run(
                [sys.executable, str(EXAMPLE / "train.py"), "--model", str(folder / "model.pt"),
                 "--seed", str(seed), "--out", str(by_hand), "--epochs", "1"],
                check=True, env={**os.environ, "PYTHONPATH": str(EXAMPLE), "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            hand = json.loads((by_hand / "metrics.json").read_text())
            assert kept["val_acc"] == pytest.approx(hand["val_acc"], abs=1e-6)
            assert kept["val_loss"] == pytest.approx(hand["val_loss"], rel=1e-5)
            per_run[variant][seed] = kept["val_acc"]
    # the same seed's variants start alike: one initialisation, BN moved (swap keeps every value)
    assert payload["start_digests"]["before/seed0"] == payload["start_digests"]["after/seed0"]
    assert payload["start_digests"]["before/seed0"] != payload["start_digests"]["before/seed1"]
    difference = payload["differences"][0]
    assert difference["differences"] == pytest.approx(
        [per_run["after"][s] - per_run["before"][s] for s in (0, 1)]
    )


def test_placeholders_and_the_last_json_line(tmp_path: Path) -> None:
    out = tmp_path / "study"
    result = CliRunner().invoke(
        main, [*_fake_study(tmp_path, "--metric", "score", "--seeds", "2"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "results.json").read_text())
    for key, metrics in payload["metrics"].items():
        variant, seed = key.split("/seed")
        assert (
            metrics["seed"] == int(seed)
            and metrics["after"] == (variant == "after")
            and metrics["on_cpu"] == 1
        )
        model = torch.load(out / "jobs" / f"{variant}-seed{seed}" / "model.pt", weights_only=False)
        assert metrics["score"] == pytest.approx(
            float(sum(p.detach().double().sum() for p in model.parameters()))
        )
        assert "epoch 1 done" in (out / "jobs" / f"{variant}-seed{seed}" / "stdout.log").read_text()
    assert sorted(_calls(tmp_path)) == ["after 0", "after 1", "before 0", "before 1"]
    assert "score (higher is better) from your training" in result.stdout
    assert payload["differences"][0]["verdict"] in result.stdout


def test_a_failing_run_is_one_line_finished_runs_stay_and_the_study_resumes(tmp_path: Path) -> None:
    out = tmp_path / "study"
    (tmp_path / "FAIL").touch()
    args = [*_fake_study(tmp_path, "--metric", "score", "--seeds", "2"), "-o", str(out)]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith(
        "bnmove: error: run before/seed1 failed (exit 3): RuntimeError: CUDA out of memory"
    )
    assert "Traceback" not in failed.stderr and str(out / "jobs" / "before-seed1") in error
    assert sorted(p.name for p in (out / "jobs").glob("*.json")) == ["after-seed0.json", "before-seed0.json"]
    assert not (out / "results.json").exists()
    (tmp_path / "FAIL").unlink()
    (tmp_path / "calls.log").unlink()
    resumed = CliRunner().invoke(main, args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 2 of 4 runs are done" in resumed.stderr
    assert sorted(_calls(tmp_path)) == ["after 1", "before 1"]  # only what was missing


def test_an_interrupted_command_study_resumes_without_repeating_runs(tmp_path: Path) -> None:
    base = _fake_study(tmp_path)
    model = torch.load(base[1], weights_only=False)
    command, jobs = base[base.index("--run") + 1], tmp_path / "jobs"

    def stop_at_the_third(event: object) -> None:
        if isinstance(event, RunStarted) and (event.variant, event.seed) == ("before", 1):
            raise KeyboardInterrupt  # Ctrl-C as the third run starts

    with pytest.raises(KeyboardInterrupt):
        experiment(
            model,
            None,
            seeds=2,
            train=command,
            metric="score",
            on_progress=stop_at_the_third,
            execution=Execution(jobs_dir=jobs),
        )
    assert sorted(p.name for p in jobs.glob("*.json")) == ["after-seed0.json", "before-seed0.json"]
    resumed = experiment(
        model, None, seeds=2, train=command, metric="score", execution=Execution(jobs_dir=jobs)
    )
    assert _calls(tmp_path) == ["before 0", "after 0", "before 1", "after 1"]  # each run once
    assert {k: m["seed"] for k, m in resumed.metrics.items()} == {
        "before/seed0": 0, "after/seed0": 0, "before/seed1": 1, "after/seed1": 1
    }  # fmt: skip


def test_options_of_bnmoves_loop_and_bad_commands_are_one_clear_line(tmp_path: Path) -> None:
    base = _fake_study(tmp_path)
    cases = {
        ("--epochs", "3"): "--epochs is for bnmove's training loop; with --run your script trains",
        ("--data", "digits"): "--data is for bnmove's training loop",
    }
    for extra, message in cases.items():
        res = CliRunner().invoke(main, [*base, *extra, "-o", str(tmp_path / "x")])
        assert res.exit_code == 1 and message in res.stderr and len(messages(res.stderr)) == 1
    model_file = base[1]
    for command, message in {
        "python train.py --seed {seed}": "put {model} in it",
        "python train.py {model} {lr}": "unknown placeholder {lr}",
    }.items():
        res = CliRunner().invoke(main, ["experiment", model_file, "--allow-pickle", "--run", command])
        assert res.exit_code == 1 and message in res.stderr, res.output
    res = CliRunner().invoke(main, ["experiment", model_file, "--allow-pickle"])
    assert res.exit_code == 1 and "give --data for bnmove's training loop, or --run" in res.stderr
    missing = CliRunner().invoke(main, [*base, "--metric", "val_acc", "-o", str(tmp_path / "m")])
    assert (
        missing.exit_code == 1
        and "reported no 'val_acc' (it reported: score, seed, after, on_cpu)" in missing.stderr
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "m" / "results.json").exists()
    # the finished run is kept: the right --metric reports from it without running it again
    calls = len(_calls(tmp_path))
    fixed = CliRunner().invoke(main, [*base, "--metric", "score", "--seeds", "1", "-o", str(tmp_path / "m")])
    assert fixed.exit_code == 0, fixed.output
    assert "resuming: 1 of 2 runs are done" in fixed.stderr and len(_calls(tmp_path)) == calls + 1


def test_a_callable_pairs_and_judges_through_the_same_code_as_the_loop() -> None:
    calls: list[tuple[str, int]] = []
    starts: dict[int, str] = {}

    def train(model: nn.Module, seed: int, device: str) -> dict[str, float]:
        after = isinstance(model.bn, nn.Sequential) or not isinstance(model.act, nn.ReLU)
        calls.append(("after" if after else "before", seed))
        starts.setdefault(seed, weights_digest(model))
        return {"val_loss": 1.0 + 0.1 * seed - (0.05 + 0.01 * seed if after else 0.0), "note": "ignored"}

    result = experiment(Tiny(), None, seeds=3, train=train, metric="val_loss", higher_is_better=False,
                        example_inputs=(torch.randn(2, 6),))  # fmt: skip
    assert sorted(calls) == [(v, s) for v in ("after", "before") for s in range(3)]
    (difference,) = result.differences()
    assert difference.differences == pytest.approx([-0.05, -0.06, -0.07])
    assert difference.verdict().startswith("after is better than before on val_loss by 0.06 (95% CI")
    assert result.metrics["after/seed2"] == {"val_loss": pytest.approx(1.13)}  # numbers only
    # bnmove's loop on the same model and seeds starts every run from the same weights
    loop = experiment(Tiny(), _blobs(), seeds=3, training=Training(epochs=1, batch_size=16))
    assert loop.start_digests == result.start_digests
    assert [starts[s] for s in range(3)] == [loop.start_digests[f"before/seed{s}"] for s in range(3)]


def test_re_runs_never_redo_work(tmp_path: Path) -> None:
    calls: list[tuple[int, str]] = []

    def train(model: nn.Module, seed: int, device: str) -> dict[str, float]:
        calls.append((seed, device))
        return {"val_accuracy": 0.5 + 0.01 * seed + 0.001 * len(calls)}

    args = {
        "train": train,
        "example_inputs": (torch.randn(2, 6),),
        "execution": Execution(jobs_dir=tmp_path / "jobs"),
    }
    first = experiment(Tiny(), None, seeds=2, **args)
    assert len(calls) == 4
    again = experiment(Tiny(), None, seeds=2, **args)
    assert len(calls) == 4 and again.metrics == first.metrics  # nothing trained, same numbers
    assert [d.verdict() for d in again.differences()] == [d.verdict() for d in first.differences()]
    more = experiment(Tiny(), None, seeds=3, placements=("original", "before", "after"), **args)
    assert len(calls) == 4 + 2 + 3  # seed 2 of before/after, and the new placement's three seeds
    assert {k: more.metrics[k] for k in first.metrics} == first.metrics
    with pytest.raises(bnmove.BnmoveError, match=r"other settings, model or data \(the training\)"):
        experiment(Tiny(), None, seeds=2, **{**args, "train": lambda m, s, d: {"val_accuracy": 1.0}})


def test_a_command_stops_with_its_run(tmp_path: Path) -> None:
    """Ctrl-C (or a failure elsewhere) while a command runs stops its whole process group."""
    process = subprocess.Popen(
        ["bash", "-c", "sleep 60 & sleep 60; wait"], start_new_session=True, stdout=subprocess.DEVNULL
    )
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), runner.child(process):
        time.sleep(0.2)
        raise KeyboardInterrupt
    assert process.poll() is not None and time.perf_counter() - started < 5
    # the background sleep went with it (the kernel takes a moment to end a killed process)
    deadline = time.perf_counter() + 3
    while _alive_in_group(process.pid) and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert _alive_in_group(process.pid) == []


def _alive_in_group(group: int) -> list[int]:
    """Processes of a process group that still run (zombies, which nobody reaps here, do not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_a_model_pickled_in_a_scripts_main_loads_with_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "trainer_script.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.bn, self.act = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU()
            def forward(self, x):
                return self.act(self.bn(self.fc(x)))
        if __name__ == "__main__":
            torch.manual_seed(3)
            torch.save(Net(), "net.pt")
    """)
    )
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(bnmove.LoadError, match="not importable here"):
        load_model("net.pt", allow_pickle=True)
    loaded = load_model("net.pt", allow_pickle=True, imports=["trainer_script"])
    assert type(loaded.module).__module__ == "trainer_script" and type(loaded.module).__name__ == "Net"
    assert loaded.notes == [
        "__main__.Net in the pickle resolved to trainer_script.Net (--import trainer_script)"
    ]
    torch.manual_seed(3)
    assert torch.equal(loaded.module.fc.weight, nn.Linear(4, 5).weight)  # the file's weights


def test_a_head_that_does_not_match_the_classes_is_refused_or_reset() -> None:
    with pytest.raises(
        bnmove.BnmoveError, match=r"the model scores 5 classes but blobs has 3 \(labels 0 to 2\)"
    ):
        experiment(Tiny(classes=5), _blobs(), seeds=1, training=Training(epochs=1))

    class Resettable(Tiny):
        def reset_classifier(self, num_classes: int) -> None:  # as timm's models offer
            self.fc2 = nn.Linear(8, num_classes)

    result = experiment(Resettable(classes=1000), _blobs(), seeds=1, training=Training(epochs=1))
    assert [n for n in result.notes if not n.startswith("threads: ")] == [
        "the model scores 1000 classes and blobs has 3: its classifier was reset to 3 classes (reset_classifier)"
    ]
    assert result.final("after").val_accuracy > 0.5


def test_a_study_at_chance_level_says_so() -> None:
    stuck = experiment(
        Tiny(),
        _blobs(noise_only=True),
        seeds=2,
        training=Training(epochs=1, batch_size=16, recipe=Recipe("adam", lr=1e-9)),
    )
    assert stuck.chance is not None and stuck.at_chance() is not None
    assert any("every run ended at chance level" in note for note in stuck.to_dict()["notes"])
    learned = experiment(
        Tiny(), _blobs(), seeds=2, training=Training(epochs=2, batch_size=16, recipe=Recipe("adam", lr=3e-2))
    )
    assert learned.at_chance() is None and min(learned.values()["after"].values()) > 0.6


def test_study_tables_fit_80_columns() -> None:
    loop = experiment(Tiny(), _blobs(), seeds=2, training=Training(epochs=1, batch_size=16))
    own = experiment(Tiny(), None, seeds=2, example_inputs=(torch.randn(2, 6),),
                     train=lambda m, s, d: {"val_accuracy": 0.6345 + 0.04 * s})  # fmt: skip
    for result in (loop, own):
        console = Console(width=80, record=True)
        console.print(experiment_table(result, width=80))
        lines = console.export_text().splitlines()
        assert max(len(line) for line in lines) <= 80
        rows = [line for line in lines if line.startswith("│")]
        assert len(rows) == 2 and all("±" in row for row in rows)  # one line per placement, nothing wrapped

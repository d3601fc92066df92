"""experiment(): identical starts and batches, numbers that match a recomputation, data errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import bnmove
from bnmove.cli import main
from bnmove.study import EpochRecord, Execution, Training
from bnmove.study.data import Dataset, Split, load_dataset
from bnmove.study.experiment import experiment, weights_digest
from bnmove.study.recipes import Recipe


class Tiny(nn.Module):
    def __init__(self, features: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, 8)
        self.bn = nn.BatchNorm1d(8)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.bn(self.fc1(x))))


def _blobs(n: int = 120, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + F.one_hot(y, 6).float() * 2.5
    return Dataset(Split(x[:90], y[:90]), Split(x[90:], y[90:]), "blobs")


def test_variants_start_equal_and_see_the_same_batches() -> None:
    data = _blobs()
    result = experiment(
        Tiny(),
        data,
        seeds=2,
        training=Training(epochs=2, batch_size=16),
        execution=Execution(keep_models=True),
    )
    for seed in result.seeds:
        assert result.start_digests[f"before/seed{seed}"] == result.start_digests[f"after/seed{seed}"]
        assert result.batch_digests[f"before/seed{seed}"] == result.batch_digests[f"after/seed{seed}"]
    assert result.start_digests["before/seed0"] != result.start_digests["before/seed1"]
    assert len(result.records) == 2 * 2 * 2
    # The placements really differ: 'after' trains the model with BN moved after GELU.
    placements = {k: [p.placement for p in bnmove.find_pairs(m)] for k, m in result.models.items()}
    assert placements["before/seed0"] == ["before"] and placements["after/seed0"] == ["after"]


def test_reported_numbers_match_a_direct_recomputation() -> None:
    data = _blobs()
    result = experiment(
        Tiny(),
        data,
        seeds=[7],
        training=Training(epochs=2, batch_size=32),
        execution=Execution(keep_models=True),
    )
    for variant in ("before", "after"):
        model = result.models[f"{variant}/seed7"].eval()
        with torch.no_grad():
            out = model(data.val.x)
        last = next(r for r in result.records if r.variant == variant and r.epoch == 2)
        assert last.val_loss == pytest.approx(float(F.cross_entropy(out, data.val.y)), rel=1e-5)
        assert last.val_accuracy == pytest.approx(float((out.argmax(1) == data.val.y).float().mean()))
    summary = result.final("after")
    assert summary.val_accuracy == pytest.approx(last.val_accuracy) and summary.val_accuracy_std == 0.0


class ScoresOutput(dict):
    """What an HF ``ModelOutput`` looks like from outside: a mapping whose fields are also attributes."""

    def __getattr__(self, name: str) -> torch.Tensor:
        return self[name]


class TinyWithModelOutput(Tiny):
    def forward(self, x: torch.Tensor) -> ScoresOutput:  # type: ignore[override]
        return ScoresOutput(loss=torch.zeros(()), logits=super().forward(x), hidden=self.fc1(x))


def test_models_returning_a_model_output_train_on_its_logits() -> None:
    """Same seed, same weights: the logits of the ModelOutput train exactly as the plain tensor does."""
    data = _blobs()
    # one thread given to both: training compared to 1e-6 needs the same thread count
    plain = experiment(Tiny(), data, seeds=[3], training=Training(epochs=2, batch_size=16, threads=1))
    wrapped = experiment(
        TinyWithModelOutput(), data, seeds=[3], training=Training(epochs=2, batch_size=16, threads=1)
    )
    for a, b in zip(plain.records, wrapped.records, strict=True):
        assert (a.variant, a.epoch) == (b.variant, b.epoch)
        assert b.val_loss == pytest.approx(a.val_loss, rel=1e-6)
        assert b.val_accuracy == a.val_accuracy


def test_same_start_as_a_manual_swap_conversion() -> None:
    data = _blobs()
    result = experiment(
        Tiny(), data, placements=["original", "after"], seeds=[3], training=Training(epochs=1)
    )
    fresh = Tiny()
    torch.manual_seed(3)
    for module in fresh.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert result.start_digests["original/seed3"] == weights_digest(fresh)


def test_learns_digits() -> None:
    data = load_dataset("digits")
    assert data.train.x.shape[1:] == (1, 8, 8) and data.num_classes == 10
    result = experiment(
        bnmove.sample_models.digits_net(),
        data,
        seeds=1,
        training=Training(epochs=2, recipe=Recipe("adam", lr=3e-3)),
    )
    assert all(result.final(v).val_accuracy > 0.6 for v in ("before", "after"))


def test_data_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 6), np.float32))
    np.savez(tmp_path / "mismatch.npz", x=np.zeros((4, 6), np.float32), y=np.zeros(3, np.int64))
    np.savez(tmp_path / "floaty.npz", x=np.zeros((4, 6), np.float32), y=np.array([0.5, 1, 2, 0]))
    np.savez(tmp_path / "wide.npz", x=np.zeros((8, 5), np.float32), y=np.arange(8) % 3)
    np.savez(tmp_path / "many.npz", x=np.zeros((8, 6), np.float32), y=np.arange(8))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "images.npy", np.zeros((4, 6), np.float32))
    cases = {
        "images.npy": r"single array \(\.npy\) without labels",
        "nolabels.npz": r"missing array\(s\) y",
        "mismatch.npz": "one label per sample",
        "floaty.npz": "integer class labels",
        "empty": "no .npz files",
        "bad.npz": "not a readable .npz",
        "missing.npz": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(bnmove.BnmoveError, match=message):
            load_dataset(tmp_path / name)
    with pytest.raises(bnmove.ModelRunError, match=r"does not accept samples of shape \(5,\)"):
        experiment(Tiny(), load_dataset(tmp_path / "wide.npz"), seeds=1, training=Training(epochs=1))
    with pytest.raises(
        bnmove.BnmoveError, match=r"the model scores 3 classes but many.npz has 8 \(labels 0 to 7\)"
    ):
        experiment(Tiny(), load_dataset(tmp_path / "many.npz"), seeds=1, training=Training(epochs=1))


def test_npz_with_validation_arrays_and_folders(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(10, 6)).astype(np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(10) % 3, x_val=x[:4], y_val=np.arange(4) % 3)
    data = load_dataset(tmp_path / "a.npz")
    assert len(data.train.y) == 10 and len(data.val.y) == 4
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        np.savez(folder / f"{i}.npz", x=x, y=np.arange(10) % 3)
    both = load_dataset(folder, val_split=0.25)
    assert len(both.train.y) + len(both.val.y) == 20 and len(both.val.y) == 5


def test_cli_experiment(tmp_path: Path) -> None:
    model_file = tmp_path / "digits.pt"
    torch.save(bnmove.sample_models.digits_net(), model_file)
    out = tmp_path / "exp"
    result = CliRunner().invoke(
        main,
        [
            "experiment",
            str(model_file),
            "--allow-pickle",
            "--data",
            "digits",
            "--epochs",
            "1",
            "--seeds",
            "2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "before" in result.stdout and "±" in result.stdout
    payload = json.loads((out / "results.json").read_text())
    assert payload["seeds"] == [0, 1] and len(payload["summary"]) == 2
    assert (out / "summary.md").exists() and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    verdict = payload["differences"][0]["verdict"]
    assert "95% CI" in verdict and "too few seeds" in verdict  # two seeds
    assert verdict in result.stdout and verdict in (out / "summary.md").read_text()
    again = CliRunner().invoke(
        main, ["experiment", str(model_file), "--allow-pickle", "--data", "digits", "-o", str(out)]
    )
    # the folder keeps these runs: other settings are refused with what changed
    assert again.exit_code == 1 and "made with other settings" in again.stderr
    assert "epochs 1 → 5" in again.stderr and again.stderr.count("error") == 1
    bad = CliRunner().invoke(
        main,
        [
            "experiment",
            str(model_file),
            "--allow-pickle",
            "--data",
            str(tmp_path / "nothing.npz"),
            "-o",
            str(tmp_path / "x"),
        ],
    )
    assert bad.exit_code == 1 and "no such file" in bad.stderr and not (tmp_path / "x").exists()
    shaped = CliRunner().invoke(
        main,
        [
            "experiment",
            str(model_file),
            "--allow-pickle",
            "--data",
            "digits",
            "--input-shape",
            "1,1,8,8",
            "-o",
            str(tmp_path / "y"),
        ],
    )
    assert (
        shaped.exit_code == 1 and "leave out --input-shape" in shaped.stderr and not (tmp_path / "y").exists()
    )


def test_uint8_images_are_scaled_and_said(tmp_path: Path) -> None:
    x = np.full((10, 1, 8, 8), 255, np.uint8)
    x[:5] = 0
    np.savez(tmp_path / "bytes.npz", x=x, y=np.arange(10) % 2)
    data = load_dataset(tmp_path / "bytes.npz")
    assert data.train.x.dtype == torch.uint8  # kept as bytes: a quarter of the memory of floats
    train, _ = data.train.tensors()
    assert train.dtype == torch.float32 and float(train.max()) == 1.0 and float(train.min()) == 0.0
    assert float(data.val.head(2).max()) <= 1.0
    assert data.notes == ["bytes.npz: x holds 8-bit values (uint8); scaled to [0, 1] by dividing by 255"]
    assert load_dataset("digits").notes == []


def test_paired_difference_interval_and_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import math
    import statistics
    import sys

    from bnmove.study.stats import paired_difference, t_quantile

    def run(diffs: list[float]):  # type: ignore[no-untyped-def]
        acc = {"before": dict.fromkeys(range(len(diffs)), 0.9)}
        acc["after"] = {i: 0.9 + d for i, d in enumerate(diffs)}
        return paired_difference("before", "after", acc)

    close = run([0.01, 0.03, 0.02])
    half = t_quantile(2) * statistics.stdev([0.01, 0.03, 0.02]) / math.sqrt(3)
    assert close.mean == pytest.approx(0.02) and close.low == pytest.approx(0.02 - half)
    assert close.high == pytest.approx(0.02 + half) and close.low < 0 < close.high
    assert close.verdict().startswith(
        "no detectable difference between before and after (after − before: 95% CI -0.5 to +4.5"
    )
    clear = run([0.02, 0.03, 0.025, 0.028, 0.022])
    assert clear.verdict() == "after is better than before by 2.5 points (95% CI 2.0 to 3.0, 5 seeds)"
    worse = run([-0.02, -0.03, -0.025, -0.028, -0.022])
    assert worse.verdict() == "before is better than after by 2.5 points (95% CI 2.0 to 3.0, 5 seeds)"
    assert "too few seeds" in run([0.01, 0.02]).verdict()
    single = run([0.04])
    assert single.low is None and "no interval without more seeds" in single.verdict()
    # The table matches scipy where scipy is here, and stands in for it where it is not.
    try:
        from scipy import stats
    except ImportError:
        stats = None
    monkeypatch.setitem(sys.modules, "scipy", None)
    for df in (1, 2, 4, 9, 19):
        table = t_quantile(df)
        if stats is not None:
            assert table == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-3)
    assert t_quantile(22) == pytest.approx(2.086)  # rounds down to 20: a slightly wider interval


def test_experiment_reports_the_paired_difference_of_its_own_records() -> None:
    result = experiment(Tiny(), _blobs(), seeds=3, training=Training(epochs=2, batch_size=16))
    (difference,) = result.differences()
    final = {
        v: {r.seed: r.val_accuracy for r in result.records if r.variant == v and r.epoch == 2}
        for v in ("before", "after")
    }
    assert difference.differences == [final["after"][s] - final["before"][s] for s in result.seeds]
    payload = result.to_dict()["differences"][0]
    assert payload["verdict"] == difference.verdict() and payload["mean"] == pytest.approx(difference.mean)


def test_an_interrupted_study_resumes_without_repeating_finished_runs(tmp_path: Path) -> None:
    data, jobs = _blobs(), tmp_path / "jobs"
    trained: list[tuple[str, int, int]] = []

    def stop_at_the_second_run(event: object) -> None:
        if not isinstance(event, EpochRecord):
            return
        trained.append((event.variant, event.seed, event.epoch))
        if (event.variant, event.seed) == ("after", 0):
            raise KeyboardInterrupt  # Ctrl-C during the second run

    with pytest.raises(KeyboardInterrupt):
        experiment(
            Tiny(),
            data,
            seeds=2,
            on_progress=stop_at_the_second_run,
            training=Training(epochs=2, batch_size=16),
            execution=Execution(jobs_dir=jobs),
        )
    assert sorted(p.name for p in jobs.iterdir()) == ["before-seed0.json"]
    trained.clear()
    resumed = experiment(
        Tiny(),
        data,
        seeds=2,
        on_progress=lambda e: (
            trained.append((e.variant, e.seed, e.epoch)) if isinstance(e, EpochRecord) else None
        ),
        training=Training(epochs=2, batch_size=16),
        execution=Execution(jobs_dir=jobs),
    )
    assert ("before", 0, 1) not in trained and len(trained) == 3 * 2  # three runs of two epochs
    fresh = experiment(Tiny(), data, seeds=2, training=Training(epochs=2, batch_size=16))
    key = lambda r: (r.variant, r.seed, r.epoch)  # noqa: E731
    for a, b in zip(sorted(resumed.records, key=key), sorted(fresh.records, key=key), strict=True):
        assert (
            key(a) == key(b) and a.val_accuracy == b.val_accuracy and a.val_loss == pytest.approx(b.val_loss)
        )
    assert resumed.start_digests == fresh.start_digests and resumed.batch_digests == fresh.batch_digests
    # Other settings cannot borrow these runs.
    with pytest.raises(bnmove.BnmoveError, match="made with other settings, model or data"):
        experiment(
            Tiny(),
            data,
            seeds=2,
            training=Training(epochs=3, batch_size=16),
            execution=Execution(jobs_dir=jobs),
        )


def test_cli_resumes_and_force_starts_over(tmp_path: Path, digits_study: list[str]) -> None:
    out = tmp_path / "study"
    args = [*digits_study, "--seeds", "2"]
    first = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in (out / "jobs").iterdir()) == [
        "after-seed0.json",
        "after-seed1.json",
        "before-seed0.json",
        "before-seed1.json",
    ]
    for name in ("results.json", "summary.md", "curves.png"):  # as if stopped before writing results
        (out / name).unlink()
    (out / "jobs" / "after-seed1.json").unlink()
    resumed = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 3 of 4 runs are done" in resumed.stderr
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["records"]) == 4
    changed = CliRunner().invoke(main, [*args[:-1], "3", "--force", "-o", str(out)])
    assert changed.exit_code == 0 and "resuming" not in changed.stderr
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1, 2]


def test_best_epoch_and_differences_per_epoch() -> None:
    result = experiment(Tiny(), _blobs(), seeds=2, training=Training(epochs=3, batch_size=16))
    for variant in ("before", "after"):
        per_seed = [
            max(r.val_accuracy for r in result.records if r.variant == variant and r.seed == s)
            for s in (0, 1)
        ]
        mean, _ = result.best(variant)
        assert mean == pytest.approx(sum(per_seed) / 2) and mean >= result.final(variant).val_accuracy
    first = {
        v: [r.val_accuracy for r in result.records if r.variant == v and r.epoch == 1]
        for v in ("before", "after")
    }
    (epoch1,) = result.differences(1)
    assert epoch1.differences == [b - a for a, b in zip(first["before"], first["after"], strict=True)]
    assert set(result.to_dict()["best_val_accuracy"]) == {"before", "after"}


def test_torch_datasets_and_loaders_are_data_too() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    blobs = _blobs()
    train, val = TensorDataset(blobs.train.x, blobs.train.y), TensorDataset(blobs.val.x, blobs.val.y)
    direct = experiment(
        Tiny(), blobs, seeds=[2], training=Training(epochs=1, batch_size=16, threads=1)
    )  # compared exactly
    for data in ((train, val), (DataLoader(train, batch_size=7), DataLoader(val, batch_size=5))):
        result = experiment(Tiny(), data, seeds=[2], training=Training(epochs=1, batch_size=16, threads=1))
        assert [r.val_accuracy for r in result.records] == [r.val_accuracy for r in direct.records]
    held = experiment(
        Tiny(), train, seeds=[2], training=Training(epochs=1, batch_size=16)
    )  # one dataset: 20% held out
    assert held.records and held.dataset == "torch data"
    with pytest.raises(bnmove.BnmoveError, match=r"items must be \(x, y\) pairs"):
        experiment(Tiny(), TensorDataset(blobs.train.x), seeds=1, training=Training(epochs=1))

"""Where and how a study's runs happen: worker processes (--jobs), Ray, streamed data, precision."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn
from torch.utils.data import Dataset as TorchDataset

import bnmove
from bnmove.cli import main
from bnmove.study import EpochRecord, Execution, RunFinished, RunStarted, Training
from bnmove.study.data import Dataset, Split, Streamed, load_dataset
from bnmove.study.experiment import ExperimentResult, experiment


class Net(nn.Module):
    """conv -> BN -> ReLU twice, pooled: a small image classifier."""

    def __init__(self, channels: int = 3, classes: int = 2) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _images(n: int = 96, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None] * 0.8
    cut = n * 3 // 4
    return Dataset(Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:]), "blobs")


def _same_runs(a: ExperimentResult, b: ExperimentResult, tolerance: float) -> None:
    """Same starts, same batches, same records in the same order, numbers within ``tolerance``
    (worker processes may use another number of threads, which changes float rounding)."""
    assert a.start_digests == b.start_digests and a.batch_digests == b.batch_digests
    assert [(r.variant, r.seed, r.epoch) for r in a.records] == [
        (r.variant, r.seed, r.epoch) for r in b.records
    ]
    for x, y in zip(a.records, b.records, strict=True):
        assert x.train_loss == pytest.approx(y.train_loss, rel=tolerance)
        assert x.val_loss == pytest.approx(y.val_loss, rel=tolerance)


def test_jobs_in_worker_processes_train_the_same_runs() -> None:
    data = _images()
    serial = experiment(
        Net(), data, seeds=2, training=Training(epochs=2, batch_size=16), execution=Execution(device="cpu")
    )
    started: list[tuple[str, int, str]] = []
    epochs: list[tuple[str, int, int]] = []
    parallel = experiment(
        Net(),
        data,
        seeds=2,
        on_progress=lambda e: (
            started.append((e.variant, e.seed, e.device))
            if isinstance(e, RunStarted)
            else epochs.append((e.variant, e.seed, e.epoch))
            if isinstance(e, EpochRecord)
            else None
        ),
        training=Training(epochs=2, batch_size=16),
        execution=Execution(devices=["cpu"], jobs=2, keep_models=True),
    )
    _same_runs(serial, parallel, 1e-3)
    assert sorted(started) == [(v, s, "cpu") for v in ("after", "before") for s in (0, 1)]
    assert sorted(epochs) == sorted((v, s, e) for v in ("before", "after") for s in (0, 1) for e in (1, 2))
    assert parallel.device == "cpu" and set(parallel.models) == {
        f"{v}/seed{s}" for v in ("before", "after") for s in (0, 1)
    }
    # the kept models are the trained ones: their accuracy is the last record's
    model = parallel.models["after/seed1"].eval()
    with torch.no_grad():
        accuracy = float((model(data.val.x).argmax(1) == data.val.y).float().mean())
    assert accuracy == parallel.records[-1].val_accuracy


def test_a_model_worker_processes_cannot_receive_is_one_clear_error() -> None:
    class Unimportable(Net):  # defined in a function: no worker process can import it
        pass

    with pytest.raises(bnmove.BnmoveError, match=r"cannot be pickled .*run with --jobs 1"):
        experiment(
            Unimportable(),
            _images(),
            seeds=2,
            training=Training(epochs=1, batch_size=16),
            execution=Execution(jobs=2, devices=["cpu"]),
        )


def test_an_interrupted_parallel_study_resumes(tmp_path: Path) -> None:
    data, jobs = _images(), tmp_path / "jobs"
    stop = threading.Event()

    def interrupt_once_a_run_is_kept(event: object) -> None:
        if isinstance(event, EpochRecord) and any(jobs.glob("*.json")):
            stop.set()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        experiment(
            Net(),
            data,
            seeds=3,
            on_progress=interrupt_once_a_run_is_kept,
            training=Training(epochs=3, batch_size=16),
            execution=Execution(jobs=2, devices=["cpu"], jobs_dir=jobs),
        )
    kept = {p.stem for p in jobs.glob("*.json")}
    assert stop.is_set() and 1 <= len(kept) < 6
    started: list[str] = []
    resumed = experiment(
        Net(),
        data,
        seeds=3,
        on_progress=lambda e: (
            started.append(f"{e.variant}-seed{e.seed}") if isinstance(e, RunStarted) else None
        ),
        training=Training(epochs=3, batch_size=16),
        execution=Execution(jobs=2, devices=["cpu"], jobs_dir=jobs),
    )
    assert not kept & set(started) and len(kept) + len(started) == 6  # nothing kept is trained again
    assert len(resumed.records) == 6 * 3


def test_ray_backend_runs_the_same_study() -> None:
    ray = pytest.importorskip("ray")
    # Ray 2.60 removed local mode (ray.init(local_mode=True) raises); a local Ray instance with two
    # CPUs is the nearest to it and runs the same code a cluster would.
    # The model's class lives in this test module: Ray's workers import it from this folder, as a
    # user's cluster would from a runtime_env. Without it, the failure is one clear error.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(bnmove.BnmoveError, match="Ray workers cannot import 'test_study_runs'"):
            experiment(
                Net(),
                _images(),
                seeds=1,
                training=Training(epochs=1, batch_size=16),
                execution=Execution(backend="ray"),
            )
    finally:
        ray.shutdown()
    here = str(Path(__file__).parent)
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": here}},
    )  # fmt: skip
    try:
        data = _images()
        serial = experiment(
            Net(),
            data,
            seeds=2,
            training=Training(epochs=2, batch_size=16),
            execution=Execution(device="cpu"),
        )
        started: list[tuple[str, int, str]] = []
        on_ray = experiment(
            Net(),
            data,
            seeds=2,
            on_progress=lambda e: started.append(e) if isinstance(e, RunStarted) else None,
            training=Training(epochs=2, batch_size=16),
            execution=Execution(devices=["cpu"], jobs=2, backend="ray"),
        )
    finally:
        ray.shutdown()
    _same_runs(serial, on_ray, 1e-3)
    assert len(started) == 4


class CountingImages(TorchDataset[tuple[torch.Tensor, int]]):
    """A map-style dataset that makes each image when asked and counts how often it was asked."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.reads = n, seed, 0
        self.targets = [i % 2 for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        g = torch.Generator().manual_seed(self.seed * 10_000 + i)
        return torch.randn(3, 8, 8, generator=g) + self.targets[i] * 0.8, self.targets[i]


def test_torch_datasets_are_streamed_batch_by_batch() -> None:
    train, val = CountingImages(64, 0), CountingImages(20, 1)
    result = experiment(
        Net(),
        (train, val),
        seeds=1,
        training=Training(epochs=2, batch_size=16, threads=1),
        execution=Execution(device="cpu"),
    )
    # every epoch reads each training item once (plus the first and last to identify the data, a
    # few to probe the model, and one batch to time a training step for the thread count);
    # nothing is gathered up front
    runs = 2 * 2  # two placements, two epochs
    assert runs * 64 <= train.reads <= runs * 64 + 16 + 16 and runs * 20 <= val.reads <= runs * 20 + 8
    # the same numbers as the same samples held in memory
    gather = lambda d: (torch.stack([d[i][0] for i in range(d.n)]), torch.tensor(d.targets))  # noqa: E731
    (tx, ty), (vx, vy) = gather(CountingImages(64, 0)), gather(CountingImages(20, 1))
    held = experiment(
        Net(),
        Dataset(Split(tx, ty), Split(vx, vy), "held"),
        seeds=1,
        training=Training(epochs=2, batch_size=16, threads=1),
        execution=Execution(device="cpu"),
    )
    assert [r.val_accuracy for r in result.records] == [r.val_accuracy for r in held.records]
    assert [r.train_loss for r in result.records] == pytest.approx(
        [r.train_loss for r in held.records], rel=1e-6
    )


def test_mixed_precision_and_channels_last_on_the_cpu(tmp_path: Path) -> None:
    data = _images()
    plain = experiment(
        Net(),
        data,
        seeds=1,
        training=Training(epochs=2, batch_size=16, threads=1),
        execution=Execution(device="cpu"),
    )
    mixed = experiment(
        Net(),
        data,
        seeds=1,
        training=Training(epochs=2, batch_size=16, amp=True, channels_last=True),
        execution=Execution(device="cpu", jobs_dir=tmp_path / "jobs"),
    )
    assert plain.precision == "float32" and mixed.precision == "mixed bfloat16, channels-last"
    assert mixed.start_digests == plain.start_digests
    for a, b in zip(plain.records, mixed.records, strict=True):  # bfloat16 rounds; training still the same
        assert np.isfinite(b.train_loss) and b.train_loss == pytest.approx(a.train_loss, rel=0.1)
        assert a.val_loss != b.val_loss
    with pytest.raises(bnmove.BnmoveError, match="made with other settings"):  # precision is a setting
        experiment(
            Net(),
            data,
            seeds=1,
            training=Training(epochs=2, batch_size=16),
            execution=Execution(device="cpu", jobs_dir=tmp_path / "jobs"),
        )


def _image_folder(root: Path, per_class: int = 12, size: int = 8) -> None:
    g = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 3)):
        for label, name in enumerate(("circle", "square")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = g.integers(0, 90, (size, size, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


def test_cli_study_on_an_image_folder_with_two_jobs(tmp_path: Path) -> None:
    _image_folder(tmp_path / "shapes")
    torch.save(Net(), tmp_path / "net.pt")
    data = load_dataset(tmp_path / "shapes")
    assert isinstance(data.train, Streamed) and len(data.train) == 24 and len(data.val) == 8
    res = CliRunner().invoke(
        main,
        [
            "experiment", str(tmp_path / "net.pt"), "--allow-pickle", "--data", str(tmp_path / "shapes"),
            "--activations", "relu,tanh", "--placements", "before,after", "--seeds", "2", "--epochs", "1",
            "--recipe", "sgd", "--augment", "--batch-size", "8", "--jobs", "2", "--precise-bn", "16",
            "-o", str(tmp_path / "out"),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for kind in ("relu", "tanh"):
        payload = json.loads((tmp_path / "out" / kind / "results.json").read_text())
        assert (
            len(payload["records"]) == 4 and payload["precision"] == "float32" and payload["precise_bn"] == 16
        )
        assert (tmp_path / "out" / kind / "summary.md").exists()
    assert res.stdout.count("seeds") >= 2 and "95% CI" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_devices_without_cuda_are_one_clear_error(tmp_path: Path, digits_study: list[str]) -> None:
    res = CliRunner().invoke(main, [*digits_study, "--devices", "cuda:0,cuda:1", "-o", str(tmp_path / "o")])
    assert res.exit_code == 1 and "device cuda:0: no CUDA GPU is visible to torch" in res.stderr
    assert not (tmp_path / "o").exists()
    per_kind = [*digits_study, "--activations", "relu,tanh", "--devices", "cuda:0", "-o", str(tmp_path / "k")]
    crossed = CliRunner().invoke(main, per_kind)
    assert crossed.exit_code == 1 and "no CUDA GPU" in crossed.stderr and not (tmp_path / "k").exists()
    both = CliRunner().invoke(
        main, [*digits_study, "--device", "cpu", "--devices", "cpu", "-o", str(tmp_path / "o")]
    )
    assert both.exit_code == 1 and "give --device or --devices, not both" in both.stderr


def test_precise_bn_evaluates_with_exact_statistics() -> None:
    data = _images()
    # one thread given to both studies: training compared bit for bit needs the same thread count
    result = experiment(
        Net(),
        data,
        seeds=1,
        training=Training(epochs=2, batch_size=16, precise_bn=40, threads=1),
        execution=Execution(device="cpu", keep_models=True),
    )
    assert result.precise_bn == 40 and result.to_dict()["precise_bn"] == 40
    model = result.models["after/seed0"]
    again = bnmove.recalibrate(model, data.train.x[:40])  # the statistics it was evaluated with
    for name, bn in model.named_modules():
        if isinstance(bn, nn.BatchNorm2d):
            torch.testing.assert_close(bn.running_mean, again.get_submodule(name).running_mean)
            torch.testing.assert_close(bn.running_var, again.get_submodule(name).running_var)
    with torch.no_grad():
        accuracy = float((model.eval()(data.val.x).argmax(1) == data.val.y).float().mean())
    assert accuracy == pytest.approx(result.records[-1].val_accuracy)
    plain = experiment(
        Net(),
        data,
        seeds=1,
        training=Training(epochs=2, batch_size=16, threads=1),
        execution=Execution(device="cpu"),
    )
    assert [r.train_loss for r in plain.records] == [r.train_loss for r in result.records]  # training alike
    assert [r.val_loss for r in plain.records] != [r.val_loss for r in result.records]  # evaluation not


def test_progress_has_a_bar_per_running_job() -> None:
    from bnmove.cli.study import _StudyProgress
    from bnmove.study.experiment import EpochRecord

    progress = _StudyProgress(False, total=4, epochs=2)
    progress.on_progress(RunStarted("before", 0, "cpu"))
    progress.on_progress(RunStarted("after", 0, "cpu"))
    assert len(progress.progress.tasks) == 3  # the study and two running jobs
    record = EpochRecord("before", 0, 1, 0.5, 0.5, 0.9, 0.1)
    progress.on_progress(record)
    progress.on_progress(EpochRecord("before", 0, 2, 0.5, 0.5, 0.9, 0.1))
    progress.on_progress(RunFinished("before", 0, {"val_accuracy": 0.9}))  # it finished: its bar goes
    study = progress.progress.tasks[0]
    assert study.completed == 2 and [t.description.strip() for t in progress.progress.tasks[1:]] == [
        "after seed 0 on cpu"
    ]
    # your own training: the study counts runs, a finished run advances it by one
    runs = _StudyProgress(False, total=2, epochs=0)
    runs.on_progress(RunStarted("after", 1, "cpu"))
    runs.on_progress(RunFinished("after", 1, {"val_acc": 0.5}))
    assert runs.progress.tasks[0].completed == 1 and len(runs.progress.tasks) == 1

"""GPUs for studies (``study/devices.py``): numbered as this process sees them, checked before any
work, passed on right to ``--run`` commands; the data moved to a device once; deterministic runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bnmove
from bnmove import BnmoveError
from bnmove.study import Execution, Training, own_training
from bnmove.study.datasets import Split
from bnmove.study.devices import check_devices, on_device, parse_devices, physical_gpu
from bnmove.study.runs import Run


def test_cuda_n_maps_through_the_parents_visible_devices() -> None:
    assert physical_gpu(1, "2,3") == "3"  # under SLURM or Kubernetes: cuda:1 is physical GPU 3
    assert physical_gpu(0, "GPU-5f1c,GPU-77aa") == "GPU-5f1c"  # UUIDs pass through
    assert physical_gpu(2, None) == "2"  # no restriction: the index is the GPU
    with pytest.raises(BnmoveError, match=r"CUDA_VISIBLE_DEVICES='2,3' makes 2 GPU\(s\) visible"):
        physical_gpu(2, "2,3")
    with pytest.raises(BnmoveError, match="CUDA_VISIBLE_DEVICES is empty"):
        physical_gpu(0, "")


def test_an_index_beyond_the_visible_gpus_is_refused_before_work() -> None:
    check_devices(parse_devices(["cpu", "cuda:0"]), count=lambda: 1)
    with pytest.raises(BnmoveError, match=r"device cuda:3: torch sees 1 GPU\(s\) here \(cuda:0 to cuda:0\)"):
        check_devices(parse_devices(["cuda:0", "cuda:3"]), count=lambda: 1)
    with pytest.raises(BnmoveError, match="not a device name"):
        parse_devices(["gpu0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_experiment_refuses_a_missing_gpu_before_any_run() -> None:
    from bnmove.sample_models import digits_net

    with pytest.raises(BnmoveError, match="device cuda:1: no CUDA GPU is visible to torch"):
        bnmove.experiment(
            digits_net(),
            "digits",
            seeds=1,
            training=Training(epochs=1),
            execution=Execution(devices=["cuda:1"]),
        )


def test_a_run_command_on_cuda_n_sees_the_parents_gpu_for_that_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command is really started: it reports the CUDA_VISIBLE_DEVICES it was given as its metric."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    script = tmp_path / "report.py"
    script.write_text(
        "import json, os, sys\n"
        "print(json.dumps({'gpu': int(os.environ['CUDA_VISIBLE_DEVICES']), 'named_cuda': int(sys.argv[1] == 'cuda')}))\n"
    )
    command = own_training.Command(f"{sys.executable} {script} {{device}} {{model}}")
    metrics = own_training._run_command(
        command, nn.Linear(2, 2), Run("after", 0), "cuda:1", tmp_path / "runs"
    )
    assert metrics == {"gpu": 3.0, "named_cuda": 1.0}
    with pytest.raises(BnmoveError, match="makes 2 GPU"):
        own_training._run_command(command, nn.Linear(2, 2), Run("after", 1), "cuda:2", tmp_path / "runs")


def test_a_split_is_moved_to_a_device_once_for_every_pass_that_asks() -> None:
    split = Split(torch.randn(10, 3), torch.arange(10))
    meta = torch.device("meta")  # a device that is not the CPU, on any machine
    first = split.batches(4, meta, train=True)
    second = split.batches(8, meta, train=False)
    assert first is not second and list(split._copies) == ["meta"]
    x, y = split._on(meta)
    assert y.device.type == "meta"
    assert x.device.type == "meta" and split._on(meta)[0] is x
    assert split._on(torch.device("cpu"))[0] is split.x  # the CPU needs no copy
    import pickle

    assert pickle.loads(pickle.dumps(split))._copies == {}  # device copies stay in their process


def test_deterministic_runs_switch_deterministic_kernels_on_and_back_off() -> None:
    before = torch.are_deterministic_algorithms_enabled()
    with on_device(torch.device("cpu"), deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() == before


def test_a_deterministic_study_repeats_bit_for_bit_and_says_so(tmp_path: Path) -> None:
    from bnmove.sample_models import digits_net

    def study() -> bnmove.ExperimentResult:
        return bnmove.experiment(
            digits_net(),
            "digits",
            placements=["after"],
            seeds=[0],
            training=Training(epochs=1, threads=1, deterministic=True),
        )

    first, second = study(), study()
    assert first.metrics == second.metrics
    losses = [[(r.train_loss, r.val_loss, r.val_accuracy) for r in s.records] for s in (first, second)]
    assert losses[0] == losses[1]
    assert first.precision.endswith("deterministic")
    with pytest.raises(BnmoveError, match="training= is for bnmove's loop"):
        bnmove.experiment(
            digits_net(),
            placements=["after"],
            train=lambda m, s, d: {},
            training=Training(deterministic=True),
        )

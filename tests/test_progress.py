"""One progress protocol: every long call gives ``on_progress`` one event value at a time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from zoo import build

import bnmove
from bnmove import Stage
from bnmove.deploy.export import ExportOptions


def test_export_says_each_variant_before_it_is_exported(tmp_path: Path) -> None:
    model, inputs = build("resnet")
    seen: list[object] = []
    bnmove.export_variants(
        model, inputs, tmp_path, ("original", "after"), options=ExportOptions(), on_progress=seen.append
    )
    assert seen == [Stage("exporting original", 0, 2), Stage("exporting after", 1, 2)]


def test_compare_names_each_step_and_recalibrate_counts_batches(tmp_path: Path) -> None:
    model, inputs = build("resnet")
    bnmove.export_variants(model, inputs, tmp_path, ("original", "after"), options=ExportOptions())
    seen: list[Stage] = []
    bnmove.compare([tmp_path], provider="cpu", batch_sizes=(1, 2), iterations=1, on_progress=seen.append)
    assert [s.what for s in seen] == [
        "loading original", "loading after", "comparing outputs", "timing batch 1", "timing batch 2",
    ]  # fmt: skip
    counted: list[Stage] = []
    data = [(torch.randn(4, *inputs[0].shape[1:]),) for _ in range(3)]
    bnmove.recalibrate(model, data, on_progress=counted.append)
    assert counted == [Stage("recalibrating", i, 3) for i in (1, 2, 3)]


def test_events_are_values() -> None:
    stage = Stage("verifying", 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stage.done = 2  # type: ignore[misc]
    assert stage == Stage("verifying", 1, 2) and hash(stage) == hash(Stage("verifying", 1, 2))

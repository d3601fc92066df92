"""INT8 variants (export --quantize int8): onnxruntime's static quantization after bnmove's folds."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import bnmove
from bnmove.cli import main
from bnmove.study.data import load_dataset
from bnmove.study.loop import train_classifier


class DigitsCNN(nn.Module):
    """conv -> BN -> ReLU twice (BN before the activation), pooled, one Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    digits = load_dataset("digits")
    model = train_classifier(DigitsCNN(), digits, epochs=2)
    return model, digits.train.head(256), digits.val.tensors()[0]


def _nodes(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _float_convs(path: Path) -> int:
    graph = onnx.load(str(path)).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    return sum(n.op_type == "Conv" and produced_by.get(n.input[0]) != "DequantizeLinear" for n in graph.node)


def test_int8_variants_of_each_placement_agree_with_their_float_variants(
    trained: tuple, tmp_path: Path
) -> None:
    model, calibration, held_out_digits = trained
    paths = bnmove.export_variants(
        model,
        (calibration[:1],),
        tmp_path,
        options=bnmove.deploy.ExportOptions(fold="padded", quantize="int8"),
        calibration=bnmove.Calibration(calibration),
        stem="net",
    )
    assert sorted(paths) == ["after", "after.int8", "before", "before.int8", "original", "original.int8"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quantization"] == {"type": "int8", "calibration_samples": 205, "held_out_samples": 51}
    x = held_out_digits.numpy()
    for variant in ("original", "before", "after"):
        int8 = paths[f"{variant}.int8"]
        onnx.checker.check_model(str(int8))
        entry = manifest["variants"][variant]["int8"]
        assert entry["file"] == int8.name and entry["held_out_samples"] == 51
        assert entry["top1_agreement_with_float"] >= 0.95 and entry["max_rel_error_vs_float"] < 0.05
        want = ort.InferenceSession(str(paths[variant]), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        got = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert (want.argmax(1) == got.argmax(1)).mean() >= 0.95  # on 359 digits no calibration saw
        assert _nodes(int8)["QuantizeLinear"] > 0
    # the after-variant's BNs are BN′ of exact moves, identities in eval: removed, the INT8 graph is
    # the before-variant's, node for node
    assert _nodes(paths["after.int8"]) == _nodes(paths["before.int8"])
    assert all(b["fate"] == "identity" for b in manifest["variants"]["after"]["bns"])
    # after an exact fold, nothing of the after-placement stays in float: no BN, no float Conv
    after = paths["after.int8"]
    assert _nodes(after)["BatchNormalization"] == 0 and _float_convs(after) == 0
    assert not any(
        n["op"] in ("BatchNormalization", "Conv")
        for n in manifest["variants"]["after"]["int8"]["float_nodes"]
    )


def test_a_bn_no_rule_folds_stays_float_and_says_why(
    trained: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, calibration, _ = trained
    caplog.set_level(logging.WARNING)
    paths = bnmove.export_variants(
        model,
        (calibration[:1],),
        tmp_path,
        ("after",),
        options=bnmove.deploy.ExportOptions(quantize="int8"),
        calibration=bnmove.Calibration(calibration),
        stem="net",
    )  # no folds: the after-variant's BNs stay standalone
    float_nodes = json.loads((tmp_path / "manifest.json").read_text())["variants"]["after"]["int8"][
        "float_nodes"
    ]
    bns = [n for n in float_nodes if n["op"] == "BatchNormalization"]
    assert len(bns) == _nodes(paths["after.int8"])["BatchNormalization"] == 2
    assert all("no int8 BatchNormalization" in n["reason"] for n in bns)
    # said once, with the reason, in the manifest: not as onnxruntime's per-channel axis warning
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]


def test_quantize_without_calibration_data_is_one_line_before_any_work(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    torch.save(DigitsCNN(), path)
    done = CliRunner().invoke(
        main, ["export", str(path), "--allow-pickle", "-o", str(tmp_path / "v"), "--quantize", "int8"]
    )
    assert done.exit_code == 1 and "--quantize needs --calibration-data" in done.stderr
    assert not (tmp_path / "v").exists()
    with pytest.raises(bnmove.BnmoveError, match="--quantize needs --calibration-data"):
        bnmove.export_variants(
            DigitsCNN(),
            (torch.rand(1, 1, 8, 8),),
            tmp_path / "w",
            options=bnmove.deploy.ExportOptions(quantize="int8"),
        )
    assert not (tmp_path / "w").exists()


def test_int8_for_tensorrt_has_signed_symmetric_activations_and_agrees_with_float(
    trained: tuple, tmp_path: Path
) -> None:
    from bnmove.deploy.sessions import tensorrt_int8_problem

    model, calibration, held_out_digits = trained
    paths = bnmove.export_variants(
        model,
        (calibration[:1],),
        tmp_path,
        ("after",),
        options=bnmove.deploy.ExportOptions(fold="forward", quantize="int8-tensorrt"),
        calibration=bnmove.Calibration(calibration),
        stem="net",
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quantization"]["type"] == "int8-tensorrt"
    entry = manifest["variants"]["after"]["int8"]
    assert "signed symmetric int8 activations" in entry["format"]
    assert entry["top1_agreement_with_float"] >= 0.95
    model_int8 = onnx.load(str(paths["after.int8"]))
    assert tensorrt_int8_problem(model_int8) is None
    x = held_out_digits.numpy()
    cpu = ["CPUExecutionProvider"]
    want = ort.InferenceSession(str(paths["after"]), providers=cpu).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(paths["after.int8"]), providers=cpu).run(None, {"x": x})[0]
    assert (want.argmax(1) == got.argmax(1)).mean() >= 0.95
    uint8 = bnmove.export_variants(
        model,
        (calibration[:1],),
        tmp_path / "cpu-form",
        ("after",),
        options=bnmove.deploy.ExportOptions(fold="forward", quantize="int8"),
        calibration=bnmove.Calibration(calibration),
        stem="net",
    )
    problem = tensorrt_int8_problem(onnx.load(str(uint8["after.int8"])))
    assert problem is not None and "uint8" in problem

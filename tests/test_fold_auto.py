"""``fold="auto"`` (``deploy/cheapest.py``): each exact form exported, timed, the fastest kept."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from test_gate_fold import InvertedResidual, _block

import bnmove
from bnmove import export_variants
from bnmove.cli import main
from bnmove.deploy import ExportOptions
from bnmove.deploy.cheapest import FormTiming, choose


def test_each_form_is_timed_and_the_kept_file_is_the_chosen_form(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _block()
    paths = export_variants(
        model, (torch.randn(1, 4, 12, 12),), tmp_path, ["original"], options=ExportOptions(fold="auto")
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["variants"]["original"]
    auto = entry["fold_auto"]
    forms = {t["form"]: t for t in auto["forms"]}
    assert set(forms) == {"none", "forward", "padded"}  # each folds more: three different files
    assert [forms[f]["standalone_bns"] for f in ("none", "forward", "padded")] == [2, 1, 0]
    assert all(t["p50_ms"] > 0 for t in forms.values())
    chosen = forms[auto["form"]]
    graph = onnx.load(str(paths["original"])).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == chosen["standalone_bns"]
    assert entry["batchnorm_nodes"] == chosen["standalone_bns"]
    assert manifest["fold"] == "auto"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "model.original.onnx"]


@pytest.mark.parametrize(("medians", "form", "says"), [
    ({"none": 1.0, "forward": 0.8, "padded": 0.9}, "forward", "fastest: 0.800 ms"),
    ({"none": 1.0, "forward": 1.01, "padded": 1.02}, "padded", "within 3%, a tie"),
    ({"none": 1.0, "forward": 1.2, "padded": 1.3}, "none", "fastest: 1.000 ms"),
])  # fmt: skip
def test_the_fastest_wins_and_a_tie_goes_to_fewer_standalone_bns(
    medians: dict[str, float], form: str, says: str
) -> None:
    timings = [FormTiming(f, ms, bns) for (f, ms), bns in zip(medians.items(), (2, 1, 0), strict=True)]
    chosen, why = choose(timings)
    assert chosen == form and says in why


def test_the_cli_takes_fold_auto_alone(tmp_path: Path) -> None:
    path = tmp_path / "block.pt"
    torch.save(InvertedResidual().state_dict(), path)
    result = CliRunner().invoke(
        main, ["export", str(path), "-o", str(tmp_path / "out"), "--fold-auto", "--fold-padded"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "bnmove: error: --fold-auto chooses between the folds itself: give it alone"
    ]
    assert not (tmp_path / "out").exists()


def test_with_int8_the_int8_forms_are_timed_and_counted(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime.quantization")
    model = _block()
    torch.manual_seed(1)
    paths = export_variants(
        model,
        (torch.randn(1, 4, 12, 12),),
        tmp_path,
        ["original"],
        calibration=bnmove.Calibration(torch.randn(24, 4, 12, 12)),
        options=ExportOptions(fold="auto", quantize="int8"),
    )
    auto = json.loads((tmp_path / "manifest.json").read_text())["variants"]["original"]["fold_auto"]
    assert auto["timed"] == "int8"
    forms = {t["form"]: t for t in auto["forms"]}
    graph = onnx.load(str(paths["original.int8"])).graph
    # a BN no fold removed stays float in the INT8 file: what was counted is what ships
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == forms[auto["form"]]["standalone_bns"]
    assert forms["padded"]["standalone_bns"] == 0 and forms["none"]["standalone_bns"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json", "model.original.int8.onnx", "model.original.onnx"
    ]  # fmt: skip

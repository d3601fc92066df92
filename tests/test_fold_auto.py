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
    assert forms["none"]["ratio"] == 1.0  # ratios are to the first form timed, with their intervals
    for t in forms.values():
        assert t["ratio_low"] <= t["ratio"] <= t["ratio_high"]
        assert t["ratio"] == pytest.approx(t["p50_ms"] / forms["none"]["p50_ms"], rel=1e-6)
    floor = auto["noise_floor"]  # the first form's file timed again in the same rounds
    assert floor["low"] <= floor["ratio"] <= floor["high"] and isinstance(auto["too_noisy"], bool)
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


def test_a_noise_floor_wider_than_the_differences_makes_them_a_tie() -> None:
    from bnmove.deploy.noise import RatioInterval

    timings = [
        FormTiming("none", 1.0, 2, 1.0, 1.0, 1.0),
        FormTiming("forward", 0.92, 1, 0.92, 0.85, 0.99),
        FormTiming("padded", 0.95, 0, 0.95, 0.9, 1.02),
    ]
    quiet = RatioInterval(1.0, 0.99, 1.01)
    assert choose(timings, quiet)[0] == "forward"  # 8% is a difference on a quiet machine
    wide = RatioInterval(1.02, 0.88, 1.12)
    form, why = choose(timings, wide)
    assert form == "padded" and "too noisy to separate the forms" in why and "0.88–1.12×" in why
    moderate = RatioInterval(1.0, 0.95, 1.05)  # 5%: forward and padded tie, none does not
    form, why = choose(timings, moderate)
    assert form == "padded" and "within 5%, a tie" in why


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

"""Export of placement variants: checker, onnxruntime agreement, manifest, fold-forward."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import outputs_of
from output import messages
from torch import nn
from zoo import build, randomize_bn

import bnmove
from bnmove.deploy import Export
from bnmove.deploy.export import ExportOptions, export_variants
from bnmove.deploy.program import save_program
from bnmove.fitting.calibrate import split_held_out


def _run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("name", ["resnet", "mlp", "nested"])
def test_export_all_variants(name: str, tmp_path: Path) -> None:
    model, inputs = build(name)
    paths = export_variants(model, inputs, tmp_path / "out", stem=name)
    assert set(paths) == {"original", "before", "after"}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    x = torch.cat([inputs[0], inputs[0] * 0.5, -inputs[0]])  # another batch size: the batch is dynamic
    for variant, path in paths.items():
        assert path.name == f"{name}.{variant}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        entry = manifest["variants"][variant]
        assert entry["onnxruntime_vs_torch_max_abs_error"] < 1e-4
        assert entry["inputs"][0]["shape"][0] == "batch"
        assert entry["file_size"] == path.stat().st_size and len(entry["sha256"]) == 64
        torch_model = (
            model if variant == "original" else bnmove.convert(model, variant, example_inputs=inputs).model
        )
        np.testing.assert_allclose(_run(path, x), outputs_of(torch_model, (x,)).numpy(), atol=1e-4, rtol=1e-4)
    moved = manifest["variants"]["after"]["moved"]
    assert moved == sum(1 for p in bnmove.find_pairs(model) if p.placement == "before" and p.movable)


def test_fold_forward_removes_foldable_batchnorms(tmp_path: Path) -> None:
    model, inputs = build("mlp")
    plain = export_variants(model, inputs, tmp_path / "plain", ["after"])
    folded = export_variants(
        model, inputs, tmp_path / "folded", ["after"], options=ExportOptions(fold="forward")
    )
    count = lambda p: sum(n.op_type == "BatchNormalization" for n in onnx.load(str(p)).graph.node)  # noqa: E731
    assert count(plain["after"]) == 2 and count(folded["after"]) == 0
    manifest = json.loads((tmp_path / "folded" / "manifest.json").read_text())
    assert manifest["variants"]["after"]["standalone_bns"] == []
    x = inputs[0]
    np.testing.assert_allclose(_run(folded["after"], x), _run(plain["after"], x), atol=1e-5, rtol=1e-5)
    torch_out = bnmove.convert(model, "after", example_inputs=inputs).model
    np.testing.assert_allclose(_run(folded["after"], x), outputs_of(torch_out, inputs).numpy(), atol=1e-5)


def test_static_batch_and_refusals(tmp_path: Path) -> None:
    model, inputs = build("mlp")
    out = tmp_path / "static"
    paths = export_variants(model, inputs, out, ["original"], options=ExportOptions(static_batch=True))
    shape = json.loads((out / "manifest.json").read_text())["variants"]["original"]["inputs"][0]["shape"]
    assert shape == list(inputs[0].shape)
    before = paths["original"].read_bytes()
    with pytest.raises(bnmove.BnmoveError, match="already exists; pass --force"):
        export_variants(model, inputs, out, ["original"])
    with pytest.raises(bnmove.BnmoveError, match="unknown variant 'sideways'"):
        export_variants(model, inputs, tmp_path / "x", ["sideways"])
    assert paths["original"].read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_export_takes_calibration_data_and_a_max_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bnmove.cli import main

    model, inputs = build("mlp")
    torch.save(model, tmp_path / "mlp.pt")
    np.save(tmp_path / "calib.npy", torch.randn(120, *inputs[0].shape[1:]).numpy())
    common = [
        "export",
        str(tmp_path / "mlp.pt"),
        "--allow-pickle",
        "--placements",
        "after",
        "--method",
        "fit",
    ]
    common += ["--calibration-data", str(tmp_path / "calib.npy")]
    res = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["calibration"] == "data"
    entry = manifest["variants"]["after"]
    assert entry["moved_fit"] >= 1 and all(m["method"] == "fit-calibrated" for m in entry["moves"])
    _, held = split_held_out([(torch.zeros(120, 1),)])
    assert entry["conversion_held_out"]["samples"] == sum(len(b[0]) for b in held) > 0
    # The fitted variant in the file is the one convert() makes from the same samples.
    want = bnmove.convert(
        model, "after", method="fit", calibration=bnmove.Calibration(np.load(tmp_path / "calib.npy"))
    )
    x = inputs[0]
    np.testing.assert_allclose(
        _run(tmp_path / "out" / "mlp.after.onnx", x),
        outputs_of(want.model, inputs).numpy(),
        atol=1e-4,
        rtol=1e-4,
    )
    refused = CliRunner().invoke(main, [*common, "--max-error", "1e-9", "-o", str(tmp_path / "strict")])
    assert refused.exit_code == 1 and len(messages(refused.output)) == 1
    assert (
        "error: after: the conversion changes outputs" in refused.output
        and "above --max-error" in refused.output
    )
    assert not (tmp_path / "strict").exists()


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnmove.deploy import export as export_module

    model, inputs = build("mlp")
    real = export_module.check_against_torch

    def bad(model, inputs, path):  # type: ignore[no-untyped-def]
        err, scale = real(model, inputs, path)
        return (err + 1.0 if "after" in path.name else err), scale

    monkeypatch.setattr(export_module, "check_against_torch", bad)
    out = tmp_path / "out"
    with pytest.raises(bnmove.BnmoveError, match="after: onnxruntime output differs"):
        export_variants(model, inputs, out)
    assert not out.exists()


def test_export_failure_names_the_root_cause(tmp_path: Path) -> None:
    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.missing(self.fc(x))  # type: ignore[attr-defined]

    with pytest.raises(bnmove.BnmoveError, match=r"ONNX export failed: AttributeError: .*'missing'"):
        export_variants(Broken(), (torch.randn(2, 3),), tmp_path / "out", ["original"])
    assert not (tmp_path / "out").exists()


def test_cli_fold_padded_leaves_only_bns_no_rule_removes(tmp_path: Path) -> None:
    """A MobileNet trained with BN after its activations (the before-placement converted, its BNs
    then given trained-like maps): every BN folds but the one no rule removes, with the reason."""
    from click.testing import CliRunner

    from bnmove.cli import main
    from bnmove.sample_models import mobilenet

    torch.manual_seed(0)
    trained_after = randomize_bn(bnmove.convert(mobilenet().eval(), "after").model, seed=0).eval()
    torch.save(trained_after, tmp_path / "m.pt")
    args = ["export", str(tmp_path / "m.pt"), "--allow-pickle", "--input-shape", "1,3,32,32"]
    res = CliRunner().invoke(
        main, [*args, "--placements", "original", "--fold-padded", "-o", str(tmp_path / "v")]
    )
    assert res.exit_code == 0, res.output
    entry = json.loads((tmp_path / "v" / "manifest.json").read_text())["variants"]["original"]
    forms = Counter(b["form"] for b in entry["bns"] if b["fate"] == "folded-forward")
    assert forms == {"border-corrected": 4, "weights": 5}  # 4 before padded depthwise convs; 4 + the head
    (left,) = entry["standalone_bns"]
    assert left["bn"] == "stem.1" and "feeds blocks.0.block.0 (Conv2d), add" in left["reason"]
    assert entry["batchnorm_nodes"] == 1


@pytest.mark.parametrize("missing", ["onnxruntime", "onnxscript"])
def test_a_missing_export_tool_is_said_before_any_work(
    missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without onnxruntime, export used to convert and export for minutes before saying so."""
    from click.testing import CliRunner

    import bnmove.deploy.export as export_module
    from bnmove.cli import main

    model, inputs = build("resnet")
    path = tmp_path / "resnet.pt"
    torch.save(model, path)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("converted before checking the tools")

    monkeypatch.setattr(export_module, "convert", no_work)
    monkeypatch.setitem(sys.modules, missing, None)  # as if it were not installed
    with pytest.raises(bnmove.BnmoveError, match=f"{missing} is not installed"):
        export_variants(model, inputs, tmp_path / "api")
    done = CliRunner().invoke(main, ["export", str(path), "--allow-pickle", "-o", str(tmp_path / "cli")])
    assert done.exit_code == 1 and f"{missing} is not installed" in done.stderr
    assert len(messages(done.stderr)) == 1
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


@pytest.mark.parametrize(
    ("pool", "dynamic"),
    [(True, ["batch", "height", "width"]), (False, ["batch"])],
)
def test_a_pt2_program_keeps_the_image_size_dynamic_where_the_model_allows(
    tmp_path: Path, pool: bool, dynamic: list[str]
) -> None:
    """Pooled to a fixed size, any image size runs; flattened into a Linear, only the one it was made for."""
    head = (
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
        if pool
        else [nn.Flatten(), nn.Linear(144, 3)]
    )
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), *head).eval()
    assert save_program(model, (torch.randn(1, 1, 8, 8),), tmp_path / "m.pt2") == dynamic
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(program(x), model(x), atol=1e-5)
    bigger = torch.randn(2, 1, 12, 10)
    if pool:
        assert torch.allclose(program(bigger), model(bigger), atol=1e-5)
    else:
        with pytest.raises(Exception):  # noqa: B017 - torch.export's guard, whatever its type
            program(bigger)


@pytest.mark.parametrize("width", [60, 80, 100, 160])
def test_the_export_table_never_cuts_a_cell_at_any_terminal_width(width: int) -> None:
    from rich.console import Console

    from bnmove import report

    entry = {
        "moved": 12, "moved_exact": 10, "moved_fit": 1, "moved_swap": 1, "batchnorm_nodes": 3,
        "standalone_bns": ["a", "b"], "onnxruntime_vs_torch_max_abs_error": 1.5e-08,
        "file_size": 12_345_678, "fold_auto": {"form": "padded"},
    }  # fmt: skip
    manifest = {
        "fold": "auto",
        "variants": {v: {**entry, "file": f"mobilenet_v3_small.{v}.onnx"} for v in ("original", "after")},
    }
    console = Console(width=width, record=True)
    console.print(report.export_table(manifest, width=width))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    assert "12 (10/1/1)" in text and "padded" in text
    if "mobilenet_v3_small.after.onnx" not in text:  # dropped for room: the title gives the pattern
        assert "mobilenet_v3_small.<variant>.onnx" in " ".join(text.split())
    if width >= 120:  # room for everything
        assert "mobilenet_v3_small.after.onnx" in text and "12.35 MB" in text


def test_export_gives_back_what_it_wrote(tmp_path: Path) -> None:
    """An `Export` value: each file by name (read as the dict earlier versions returned) and the
    manifest that manifest.json holds, never changed after it is made."""
    model = bnmove.sample_models.resnet().eval()
    x = torch.randn(2, 3, 16, 16)
    exported = bnmove.export_variants(model, (x,), tmp_path, ["original", "after"], stem="m")
    assert isinstance(exported, Export)
    assert dict(exported) == {v: tmp_path / f"m.{v}.onnx" for v in ("original", "after")}
    assert all(path.exists() for path in exported.values())
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert json.loads(json.dumps(exported.manifest)) == on_disk
    assert exported.variants["after"]["moved"] == len(on_disk["variants"]["after"]["moves"]) > 0
    assert exported.warnings() == [] and exported.notes() == []
    with pytest.raises(FrozenInstanceError):
        exported.manifest = {}  # type: ignore[misc]

"""Every user mistake: one line on stderr, exit code 1, no traceback, nothing written, input untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from output import messages
from torch import nn
from zoo import build

from bnmove.cli import main


class Raises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        raise RuntimeError(f"this model is broken on purpose (got {y.dim()}-d features)")


def _make_corpus(root: Path) -> dict[str, Path]:
    model, _ = build("resnet")
    files = {
        "pickled": root / "resnet.pt",
        "state": root / "resnet_sd.pt",
        "empty": root / "empty.pt",
        "truncated": root / "truncated.pt",
        "random": root / "random.pt",
        "json": root / "config.json",
        "onnx": root / "model.onnx",
        "script": root / "scripted.pt",
        "raises": root / "raises.pt",
        "existing": root / "resnet.after.pt",
    }
    torch.save(model, files["pickled"])
    torch.save(model.state_dict(), files["state"])
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(files["state"].read_bytes()[:4096])
    files["random"].write_bytes(bytes((i * 7919) % 256 for i in range(5000)))
    files["json"].write_text(json.dumps({"layers": [3, 4]}))
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(files["onnx"]))
    torch.jit.script(model).save(str(files["script"]))
    torch.save(Raises(), files["raises"])
    files["existing"].write_bytes(b"precious")
    (root / "folder.pt").mkdir()
    files["folder"] = root / "folder.pt"
    files["badcal"] = root / "calibration_5_channels.npy"
    np.save(files["badcal"], np.random.default_rng(0).standard_normal((16, 5, 8, 8)).astype("float32"))
    return files


CASES: dict[str, tuple[list[str], str]] = {
    "missing path": (["convert", "{root}/nope.pt", "--placement", "after"], "no such file"),
    "a directory": (["inspect", "{folder}"], "is a directory"),
    "empty file": (["inspect", "{empty}"], "is empty"),
    "truncated .pt": (["inspect", "{truncated}"], "truncated or corrupted"),
    "random bytes": (
        ["convert", "{random}", "--placement", "after", "--allow-pickle"],
        "not a PyTorch model file",
    ),
    "json to convert": (["convert", "{json}", "--placement", "after"], "is a JSON file"),
    "onnx to convert": (["convert", "{onnx}", "--placement", "after"], "is an ONNX model"),
    "pickle without opt-in": (
        ["convert", "{pickled}", "--placement", "after", "-o", "{root}/new.pt"],
        "pass --allow-pickle",
    ),
    "state dict without arch": (["inspect", "{state}"], "--arch package.module:callable"),
    "arch does not import": (
        ["inspect", "{state}", "--arch", "nowhere.models:net"],
        "cannot import nowhere.models",
    ),
    "arch not callable": (["inspect", "{state}", "--arch", "zoo:ZOO"], "is not callable"),
    "arch does not match": (
        ["convert", "{state}", "--arch", "zoo:MLP", "--placement", "after"],
        "does not match --arch",
    ),
    "torchscript": (["convert", "{script}", "--placement", "after", "--allow-pickle"], "TorchScript archive"),
    "input shape rejected": (
        [
            "convert",
            "{pickled}",
            "--allow-pickle",
            "--placement",
            "after",
            "--input-shape",
            "2,7,8,8",
            "-o",
            "{root}/new.pt",
        ],
        "forward raised RuntimeError on input 2x7x8x8",
    ),
    "forward raises": (
        ["convert", "{raises}", "--allow-pickle", "--placement", "after", "--input-shape", "2,3,8,8"],
        "this model is broken on purpose",
    ),
    "output in missing folder": (
        ["convert", "{pickled}", "--allow-pickle", "--placement", "after", "-o", "{root}/no/such/out.pt"],
        "does not exist",
    ),
    "output in unwritable place": (
        [
            "convert",
            "{pickled}",
            "--allow-pickle",
            "--placement",
            "after",
            "-o",
            "/proc/bnmove-out.pt",
            "--input-shape",
            "2,3,8,8",
        ],
        "cannot write",
    ),
    "existing output": (["convert", "{pickled}", "--allow-pickle", "--placement", "after"], "already exists"),
    "export into a file": (
        ["export", "{pickled}", "--allow-pickle", "-o", "{json}", "--input-shape", "2,3,8,8"],
        "exists and is not a folder",
    ),
    "compare non-onnx": (["compare", "{root}/no-such-dir"], "no such file or folder"),
    "export under a file": (
        ["export", "{pickled}", "--allow-pickle", "-o", "{json}/variants", "--input-shape", "2,3,8,8"],
        "config.json is a file, not a folder",
    ),
    "export where nothing can be written": (
        ["export", "{pickled}", "--allow-pickle", "-o", "/proc/bnmove-variants", "--input-shape", "2,3,8,8"],
        "cannot write in /proc",
    ),
    "export in a missing folder": (
        [
            "export",
            "{pickled}",
            "--allow-pickle",
            "-o",
            "{root}/no/such/variants",
            "--input-shape",
            "2,3,8,8",
        ],
        "folder {root}/no/such does not exist",
    ),
    "experiment under a file": (
        [
            "experiment",
            "{pickled}",
            "--allow-pickle",
            "--data",
            "digits",
            "--seeds",
            "1",
            "-o",
            "{json}/study",
        ],
        "config.json is a file, not a folder",
    ),
    "demo under a file": (["demo", "-o", "{json}/demo"], "config.json is a file, not a folder"),
    "demo where nothing can be written": (["demo", "-o", "/proc/bnmove-demo"], "cannot write in /proc"),
    "inspect with a shape the model rejects": (
        ["inspect", "{pickled}", "--allow-pickle", "--input-shape", "2,7,8,8"],
        "forward raised RuntimeError on input 2x7x8x8",
    ),
    "calibration data the model rejects": (
        [
            "export",
            "{pickled}",
            "--allow-pickle",
            "--quantize",
            "int8",
            "--calibration-data",
            "{badcal}",
            "-o",
            "{root}/int8",
        ],
        "rejects the calibration data {badcal} (samples of shape 5x8x8)",
    ),
    "recalibrate wrong-shaped data": (
        ["recalibrate", "{pickled}", "--allow-pickle", "--calibration-data", "{badcal}", "-o", "{root}/r.pt"],
        "rejects the calibration data {badcal} (samples of shape 5x8x8)",
    ),
    "compare unreadable onnx": (
        ["compare", "{truncated}", "--provider", "cpu"],
        "not an ONNX file onnx can read",
    ),
    "experiment bad device": (
        [
            "experiment",
            "{pickled}",
            "--allow-pickle",
            "--run",
            "true {{model}}",
            "--device",
            "tpu",
            "-o",
            "{root}/s",
        ],
        "device 'tpu': not a device name",
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make_corpus(tmp_path_factory.mktemp("corpus"))


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, corpus: dict[str, Path]) -> None:
    args, message = CASES[case]
    root = corpus["pickled"].parent
    names = {k: str(v) for k, v in corpus.items()} | {"root": str(root)}
    before = _snapshot(root)
    result = CliRunner().invoke(main, [a.format(**names) for a in args])
    assert result.exit_code == 1, result.output
    lines = messages(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("bnmove: error: "), result.stderr
    assert message.format(**names) in lines[0]
    assert "Traceback" not in result.output
    assert _snapshot(root) == before  # nothing written, nothing changed


def test_unknown_choices_are_usage_errors(corpus: dict[str, Path]) -> None:
    for args in (["--placement", "middle"], ["--placement", "after", "--method", "best"]):
        result = CliRunner().invoke(main, ["convert", str(corpus["pickled"]), "--allow-pickle", *args])
        assert result.exit_code == 2 and "Invalid value" in result.stderr


def test_model_without_batchnorm_is_not_an_error(tmp_path: Path) -> None:
    model, _ = build("no-bn")
    path = tmp_path / "plain.pt"
    torch.save(model, path)
    inspect = CliRunner().invoke(main, ["inspect", str(path), "--allow-pickle"])
    assert inspect.exit_code == 0 and "nothing to move" in inspect.stdout
    convert = CliRunner().invoke(
        main, ["convert", str(path), "--allow-pickle", "--placement", "after", "--input-shape", "2,3,8,8"]
    )
    assert convert.exit_code == 0 and "nothing moved: the model has no BatchNorm" in convert.stdout

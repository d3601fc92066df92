"""The sample models are written as loadable files, and the demo runs end to end.

The example scripts run through their READMEs (``examples/*/README.md``, see ``conftest.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import bnmove
from bnmove.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_make_models_writes_loadable_files(tmp_path: Path) -> None:
    out = tmp_path / "models"
    _run("-m", "samples.make_models", "-o", str(out))
    from bnmove.sample_models import SAMPLES

    for name, (factory, shape) in SAMPLES.items():
        pickled = bnmove.load_model(out / f"{name}.pt", allow_pickle=True).module
        state = bnmove.load_model(out / f"{name}.state.pt", arch=f"samples.models:{name}").module
        x = torch.randn(2, *shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(pickled.eval()(x), state.eval()(x))
        assert isinstance(factory(), torch.nn.Module)


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for step in (
        "1. a sample model",
        "2. bnmove inspect",
        "3. bnmove convert",
        "4. bnmove export",
        "5. bnmove compare",
        "6. bnmove experiment",
        "files",
    ):
        assert step in text
    assert "top-1 agreement with the original on 359 digits: 100.0%" in text  # the exact 'after' conversion
    for name in (
        "digits_net.pt",
        "digits_net.after.pt",
        "variants/manifest.json",
        "compare.md",
        "experiment/results.json",
        "experiment/curves.png",
    ):
        assert (out / name).exists(), name
    converted = torch.load(out / "digits_net.after.pt", weights_only=False)
    assert all(p.placement == "after" for p in bnmove.find_pairs(converted) if p.placement)
    again = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr

"""``benchmarks/gpu_report.py --dry-run``: the GPU report's code, run on the CPU at tiny sizes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_report():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_writes_every_section_with_figures_and_intervals(gpu_report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report.md"
    assert gpu_report.main(["--dry-run", "-o", str(out)]) == 0
    text = out.read_text()
    assert "- provider cpu: works" in text and "torch " in text and "onnxruntime " in text
    for kind, variant in (("float", "after"), ("int8", "after.int8")):
        section = text.split(f"### {kind} on cpu")[1].split("###")[0]
        rows = re.findall(
            rf"\| (\d) \| {re.escape(variant)} \| (\S+) \| ([\d.]+) \| ([\d.]+)× \(([\d.]+)–([\d.]+)\)",
            section,
        )
        assert [r[0] for r in rows] == ["1", "2"], section
        for _, precision, p50, ratio, low, high in rows:
            assert precision == ("int8" if kind == "int8" else "float32")
            assert float(p50) > 0 and float(low) <= float(ratio) <= float(high)
        assert "noise floor" in section and "timed with the CPU provider" in section
    study = text.split("## One epoch of the digits study on cpu")[1]
    accuracies = re.findall(r"\| (before|after)/seed0 \| ([\d.]+)% \|", study)
    assert sorted(a[0] for a in accuracies) == ["after", "before"]
    assert "## Not run" not in text


def test_steps_past_the_budget_are_listed_not_dropped(gpu_report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report.md"
    gpu_report.main(["--dry-run", "--budget-s", "0", "-o", str(out)])
    not_run = out.read_text().split("## Not run")[1]
    assert "export sample_resnet (the 0 s budget was spent)" in not_run
    assert "one epoch of the digits study on cpu" in not_run

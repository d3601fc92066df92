"""compare() on the CPU provider, its report formats, and provider selection."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from output import messages
from scipy import stats
from zoo import build

from bnmove import BnmoveError, report
from bnmove.cli import main
from bnmove.deploy import runtime
from bnmove.deploy import runtime as compare_module
from bnmove.deploy.accuracy import wilson_interval
from bnmove.deploy.export import ExportOptions, export_variants
from bnmove.deploy.providers import provider_works


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs = build("resnet")
    out = tmp_path_factory.mktemp("variants")
    export_variants(model, inputs, out, stem="resnet", options=ExportOptions(fold="forward"))
    return out


@pytest.fixture(scope="module")
def result(variants: Path) -> compare_module.Comparison:
    return runtime.compare([variants], provider="cpu", batch_sizes=(1, 4), warmup=1, iterations=5)


def test_numbers_are_sane(result: compare_module.Comparison) -> None:
    assert result.provider == "cpu" and result.reference == "original"
    assert [v.name for v in result.variants] == ["original", "before", "after"]
    assert len(result.timings) == 6
    for t in result.timings:
        assert t.runs == 5
        assert 0 < t.p50_ms <= t.p90_ms <= t.p99_ms
        # one statistic throughout: throughput and ratios come from the median the table shows
        assert t.mean_ms > 0 and t.throughput == pytest.approx(t.batch_size / (t.p50_ms / 1000))
        ref = result.timing(result.reference, t.batch_size)
        assert t.ratio == pytest.approx(t.p50_ms / ref.p50_ms)
    assert all(t.ratio == 1.0 for t in result.timings if t.variant == "original")
    # every ratio with its interval over the rounds, and a noise floor per batch size
    assert all(t.ratio_low <= t.ratio <= t.ratio_high for t in result.timings)
    assert set(result.noise_floor) == {1, 4}
    assert all(f.low <= f.ratio <= f.high for f in result.noise_floor.values())
    devs = {d.variant: d for d in result.deviations}
    assert devs["original"].max_abs == 0.0 and devs["original"].cosine == pytest.approx(1.0)
    assert devs["original"].top1_agreement == 1.0
    assert devs["after"].max_abs < 1e-4  # auto conversion of this model is exact
    after = next(v for v in result.variants if v.name == "after")
    original = next(v for v in result.variants if v.name == "original")
    # The after-variant's BNs are BN′ of exact moves, identities in eval: the fold removes them, and
    # onnxruntime runs the original's nodes (unremoved, they survive its fusion as 1x1 depthwise convs)
    assert after.optimized_nodes == original.optimized_nodes
    assert after.file_size > 0


def test_every_report_format(result: compare_module.Comparison, tmp_path: Path) -> None:
    payload = json.loads(report.comparison_json(result))
    assert payload["timings"][0]["variant"] == "original" and len(payload["deviations"]) == 3
    rows = list(csv.DictReader(io.StringIO(report.comparison_csv(result))))
    assert len(rows) == 6 and float(rows[0]["mean_ms"]) == pytest.approx(result.timings[0].mean_ms)
    markdown = report.comparison_markdown(result)
    assert markdown.count("\n| after |") == 2 and "onnxruntime" in markdown
    plot = tmp_path / "plot.png"
    report.comparison_plot(result, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnmove.deploy import providers

    monkeypatch.setattr(providers, "_WORKS", {})
    monkeypatch.setattr(providers, "_nvidia_driver_present", lambda: False)
    assert providers.select_provider("auto") == "cpu"
    for name in ("cuda", "tensorrt"):
        with pytest.raises(BnmoveError, match=f"provider '{name}' is not available here"):
            providers.select_provider(name)
    with pytest.raises(BnmoveError, match="unknown provider"):
        providers.select_provider("tpu")


def test_auto_prefers_working_gpu_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnmove.deploy import providers

    works = {"tensorrt": False, "cuda": True, "cpu": True}
    monkeypatch.setattr(providers, "provider_works", lambda name: works[name])
    assert providers.select_provider("auto") == "cuda"
    works["tensorrt"] = True
    assert providers.select_provider("auto") == "tensorrt"


def test_bad_arguments(variants: Path, tmp_path: Path) -> None:
    with pytest.raises(BnmoveError, match=r"no \.onnx files"):
        runtime.compare([tmp_path], provider="cpu")
    with pytest.raises(BnmoveError, match="batch sizes must be positive"):
        runtime.compare([variants], provider="cpu", batch_sizes=(0,))
    with pytest.raises(BnmoveError, match="reference variant 'nope'"):
        runtime.compare([variants], provider="cpu", reference="nope", iterations=1)


def test_cli_export_then_compare(tmp_path: Path) -> None:
    import torch

    model, _ = build("resnet")
    model_file = tmp_path / "net.pt"
    torch.save(model, model_file)
    out = tmp_path / "variants"
    runner = CliRunner()
    exported = runner.invoke(
        main,
        [
            "export",
            str(model_file),
            "--allow-pickle",
            "-o",
            str(out),
            "--placements",
            "original,after",
            "--input-shape",
            "2,3,8,8",
            "--fold-forward",
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "net.after.onnx", "net.original.onnx"]
    assert "next: bnmove compare" in exported.stdout
    reports = {k: tmp_path / f"r.{k}" for k in ("json", "csv", "md", "png")}
    compared = runner.invoke(
        main,
        [
            "compare",
            str(out),
            "--provider",
            "cpu",
            "--batch-sizes",
            "1,2",
            "--iterations",
            "3",
            "--warmup",
            "1",
            "--json-file",
            str(reports["json"]),
            "--csv",
            str(reports["csv"]),
            "--markdown",
            str(reports["md"]),
            "--plot",
            str(reports["png"]),
        ],
    )
    assert compared.exit_code == 0, compared.output
    assert "original" in compared.stdout and "after" in compared.stdout and "samples/s" in compared.stdout
    assert all(p.stat().st_size > 0 for p in reports.values())
    again = runner.invoke(
        main,
        ["compare", str(out), "--provider", "cpu", "--iterations", "1", "--json-file", str(reports["json"])],
    )
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr
    stdout_json = runner.invoke(
        main,
        ["compare", str(out), "--provider", "cpu", "--iterations", "2", "--batch-sizes", "1", "--json"],
    )
    assert json.loads(stdout_json.stdout)["provider"] == "cpu"
    if not provider_works("cuda"):  # (on a GPU machine, CUDA is there to compare on)
        bad = runner.invoke(main, ["compare", str(out), "--provider", "cuda"])
        assert bad.exit_code == 1 and "provider 'cuda' is not available" in bad.stderr
    both = runner.invoke(main, ["compare", str(out), "--iterations", "2", "--seconds", "1"])
    assert both.exit_code == 2


def test_probing_a_provider_that_fails_to_load_is_silent_and_false(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Pretend a driver is present: onnxruntime really tries CUDA here, fails, and says nothing."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to probe")
    from bnmove.deploy import providers

    monkeypatch.setattr(providers, "_WORKS", {})
    monkeypatch.setattr(providers, "_nvidia_driver_present", lambda: True)
    capfd.readouterr()
    works = providers.provider_works("cuda")
    out, err = capfd.readouterr()
    import torch

    assert works is torch.cuda.is_available()
    if not works:
        assert err == "" and out == ""


def test_timing_for_a_batch_size_not_timed_is_a_clear_error(result: compare_module.Comparison) -> None:
    assert result.timing("after", result.timings[0].batch_size).variant == "after"
    with pytest.raises(BnmoveError, match=r"no timing for variant 'after' at batch size 999 \(timed: after@"):
        result.timing("after", 999)


def test_a_variant_that_computes_something_else_is_marked(tmp_path: Path) -> None:
    model, inputs = build("resnet")
    from zoo import randomize_bn

    randomize_bn(model)
    export_variants(model, inputs, tmp_path, ["original", "after"], stem="resnet", method="swap")
    swapped = runtime.compare([tmp_path], provider="cpu", batch_sizes=(1,), warmup=0, iterations=2)
    dev = {d.variant: d for d in swapped.deviations}
    assert dev["after"].deviates and dev["after"].max_rel > 1e-2 and not dev["original"].deviates
    assert "after ≠" in report.comparison_markdown(swapped)
    note = report.deviation_note(swapped)
    assert (
        note is not None and note.startswith("≠ outputs differ from 'original'") and "after (max |Δ|" in note
    )
    plot = tmp_path / "c.png"
    report.comparison_plot(swapped, plot)
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_exact_variants_are_not_marked(result: compare_module.Comparison) -> None:
    assert not any(d.deviates for d in result.deviations) and report.deviation_note(result) is None


def test_compare_table_reads_at_80_columns(result: compare_module.Comparison) -> None:
    from rich.console import Console

    def render(width: int) -> list[str]:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(report.comparison_table(result, width=width))
        return console.export_text().splitlines()

    narrow, wide = render(80), render(160)
    assert all(len(line) <= 80 for line in narrow)
    header = next(line for line in narrow if "variant" in line)
    assert "ratio" in header and "top-1" in header and "samples/s" in header  # the important ones stay
    assert "cosine" not in header and "size" not in header  # the least important go
    body = [line for line in narrow if line.startswith("│ ")]
    assert len(body) == len(result.timings)  # one line per row: nothing wraps a word per line
    assert "cosine" in next(line for line in wide if "variant" in line)


def test_missing_onnxruntime_is_one_line_naming_both_builds(
    variants: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without either extra sees
    with pytest.raises(BnmoveError, match=r"bnmove\[gpu\].*bnmove\[cpu\]"):
        runtime.import_onnxruntime()
    res = CliRunner().invoke(main, ["compare", str(variants), "--json-file", str(tmp_path / "c.json")])
    assert res.exit_code == 1, res.output
    assert len(messages(res.output)) == 1 and "onnxruntime is not installed" in res.output
    assert not (tmp_path / "c.json").exists()


# --- accuracy on the user's labelled data (compare --data) ---


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A digits CNN trained briefly, its original and its after-variant made by swap (which
    changes some predictions), and 60 held-out digits with their labels."""
    from bnmove.sample_models import digits_net
    from bnmove.study.data import load_dataset
    from bnmove.study.loop import train_classifier

    torch.manual_seed(0)
    digits = load_dataset("digits")
    model = train_classifier(digits_net(), digits, epochs=2)
    x, y = (t[:60].numpy() for t in digits.val.tensors())
    folder = tmp_path_factory.mktemp("swapped")
    export_variants(
        model, (torch.from_numpy(x[:1]),), folder, ("original", "after"), method="swap", stem="net"
    )
    return folder, x, y


def test_accuracy_and_its_paired_difference_equal_a_hand_computation(swapped: tuple) -> None:
    folder, x, y = swapped
    result = runtime.compare([folder], provider="cpu", batch_sizes=(1,), iterations=1, data=(x, y))
    acc = {a.variant: a for a in result.accuracies}
    sessions = {
        name: ort.InferenceSession(str(folder / f"net.{name}.onnx"), providers=["CPUExecutionProvider"])
        for name in ("original", "after")
    }
    hits = {name: s.run(None, {"x": x})[0].argmax(1) == y for name, s in sessions.items()}
    assert acc["original"].correct == int(hits["original"].sum()) and acc["original"].samples == 60
    assert acc["after"].correct == int(hits["after"].sum()) and acc["after"].samples == 60
    d = hits["after"].astype(float) - hits["original"].astype(float)
    assert d.any(), "the swap should change some predictions, or the test compares nothing"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert acc["after"].difference == pytest.approx(d.mean())
    assert acc["after"].difference_low == pytest.approx(d.mean() - half)
    assert acc["after"].difference_high == pytest.approx(d.mean() + half)
    assert acc["original"].difference is None
    assert (acc["original"].low, acc["original"].high) == pytest.approx(
        wilson_interval(int(hits["original"].sum()), 60)
    )
    assert result.to_dict()["accuracies"][1]["accuracy"] == pytest.approx(acc["after"].accuracy)


def test_wilson_interval_matches_the_textbook_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 50) == pytest.approx((0.0, 0.0714), abs=1e-4)


def test_cli_compare_data_reports_accuracy_in_table_json_and_markdown(swapped: tuple, tmp_path: Path) -> None:
    folder, x, y = swapped
    session = ort.InferenceSession(str(folder / "net.original.onnx"), providers=["CPUExecutionProvider"])
    correct = int((session.run(None, {"x": x})[0].argmax(1) == y).sum())
    np.savez(tmp_path / "labelled.npz", x=x, y=y, x_val=x, y_val=y)
    args = [
        "compare",
        str(folder),
        "--provider",
        "cpu",
        "--batch-sizes",
        "1",
        "--iterations",
        "1",
        "--data",
        str(tmp_path / "labelled.npz"),
    ]
    done = CliRunner().invoke(
        main, [*args, "--markdown", str(tmp_path / "r.md"), "--json-file", str(tmp_path / "r.json")]
    )
    assert done.exit_code == 0, done.output
    assert "top-1 accuracy on 60 labelled samples" in done.stdout and f"{correct / 60:.1%}" in done.stdout
    assert f"| original | {correct / 60:.1%} |" in (tmp_path / "r.md").read_text()
    accuracies = json.loads((tmp_path / "r.json").read_text())["accuracies"]
    assert accuracies[0]["variant"] == "original" and accuracies[0]["correct"] == correct
    fewer = CliRunner().invoke(main, [*args, "--data-samples", "10", "--json"])
    assert json.loads(fewer.stdout)["accuracies"][0]["samples"] == 10


@pytest.mark.parametrize(
    "labels, shape, message",
    [
        (12, (1, 8, 8), "label 12 but original scores 10 classes"),
        (0, (3, 8, 8), "original cannot run on inputs of shape 3x8x8"),
    ],
)
def test_bad_labelled_data_is_one_line_before_any_timing(
    swapped: tuple, tmp_path: Path, labels: int, shape: tuple[int, ...], message: str
) -> None:
    folder = swapped[0]
    np.savez(tmp_path / "bad.npz", x=np.zeros((20, *shape), np.float32), y=np.full(20, labels))
    done = CliRunner().invoke(
        main, ["compare", str(folder), "--provider", "cpu", "--data", str(tmp_path / "bad.npz")]
    )
    assert done.exit_code == 1 and message in done.stderr, done.output
    assert len(messages(done.stderr)) == 1 and "p50" not in done.stdout and "timing" not in done.stderr

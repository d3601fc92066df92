"""The CLI through click's runner: output, exit codes, files written and not written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_outputs
from output import messages
from torch import nn
from zoo import build

import bnmove
from bnmove import find_pairs
from bnmove.cli import main


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def resnet_files(tmp_path: Path) -> dict[str, Path]:
    model, _ = build("resnet")
    pickled, state = tmp_path / "resnet.pt", tmp_path / "resnet_sd.pt"
    torch.save(model, pickled)
    torch.save(model.state_dict(), state)
    return {"pickled": pickled, "state": state}


def run(*args: str | Path) -> subprocess.CompletedProcess[str] | object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_inspect_table(resnet_files: dict[str, Path]) -> None:
    result = run("inspect", resnet_files["pickled"], "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert "layer1.0.bn1" in result.stdout and "ReLU" in result.stdout
    assert (
        "4 pairs (4 BN before activation, 0 after), 4 movable, 4 exactly, 3 BatchNorm not adjacent"
        in " ".join(result.stdout.split())
    )


def test_inspect_json(resnet_files: dict[str, Path]) -> None:
    result = run("inspect", resnet_files["state"], "--arch", "zoo:TinyResNet", "--json")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    model, _ = build("resnet")
    assert payload["pairs"] == [p.to_dict() for p in find_pairs(model)]


@pytest.mark.parametrize("fold", ["forward", "padded"])
def test_inspect_deploy_shows_what_export_does_with_each_bn(
    resnet_files: dict[str, Path], tmp_path: Path, fold: str
) -> None:
    """``inspect --deploy`` reports, BN by BN, the fate and reason export's manifest records for the
    same model and folds (one decision, carried out and reported alike)."""
    converted = tmp_path / "resnet.after.pt"
    assert (
        run(
            "convert", resnet_files["pickled"], "--allow-pickle", "--placement", "after", "-o", converted
        ).exit_code
        == 0
    )
    shown = run("inspect", converted, "--allow-pickle", "--deploy", fold, "--json")
    assert shown.exit_code == 0, shown.output
    deploy = json.loads(shown.stdout)["deploy"]
    out = tmp_path / "variants"
    exported = run(
        "export", converted, "--allow-pickle", "--placements", "original", f"--fold-{fold}", "-o", out
    )
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert deploy["fold"] == fold and deploy["bns"] == manifest["variants"]["original"]["bns"]
    assert {b["fate"] for b in deploy["bns"]} >= {"identity", "fused-backward"}
    table = run("inspect", converted, "--allow-pickle", "--deploy", fold)
    assert "removed (identity)" in table.stdout and "fused backward" in table.stdout


def test_convert_pickled_resnet_end_to_end(resnet_files: dict[str, Path]) -> None:
    source = resnet_files["pickled"]
    digest = _digest(source)
    result = run("convert", source, "--allow-pickle", "--placement", "after", "--input-shape", "2,3,8,8")
    assert result.exit_code == 0, result.output
    out = source.with_name("resnet.after.pt")
    assert out.exists() and f"wrote {out}" in " ".join(result.stdout.split())
    assert "moved 4 of 4 BN–activation pairs (4 folded exactly)" in " ".join(result.stdout.split())
    assert _digest(source) == digest  # the input is never modified

    converted = torch.load(out, weights_only=False)
    original, inputs = build("resnet")
    assert_same_outputs(original, converted, inputs)
    pairs = [p for p in find_pairs(converted) if p.movable]
    assert pairs and all(p.placement == "after" for p in pairs)

    again = run("inspect", out, "--allow-pickle", "--json")
    assert {p["placement"] for p in json.loads(again.stdout)["pairs"] if p["movable"]} == {"after"}


def test_convert_refuses_to_overwrite(resnet_files: dict[str, Path]) -> None:
    source = resnet_files["pickled"]
    out = source.with_name("taken.pt")
    out.write_bytes(b"keep me")
    result = run("convert", source, "--allow-pickle", "--placement", "after", "-o", out)
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "already exists; pass --force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = run("convert", source, "--allow-pickle", "--placement", "after", "-o", source, "--force")
    assert result.exit_code == 1 and "refusing to overwrite the input" in result.stderr
    forced = run("convert", source, "--allow-pickle", "--placement", "after", "-o", out, "--force")
    assert forced.exit_code == 0 and out.read_bytes() != b"keep me"


def test_convert_json_and_code_dir(resnet_files: dict[str, Path], tmp_path: Path) -> None:
    code = tmp_path / "code"
    result = run(
        "convert",
        resnet_files["state"],
        "--arch",
        "zoo:TinyResNet",
        "--placement",
        "after",
        "--method",
        "swap",
        "--code-dir",
        code,
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["moved_swap"] == 4 and payload["verification"]["max_abs_error"] > 0
    assert (code / "module.py").exists() and (code / "state_dict.pt").exists()
    sys.path.insert(0, str(tmp_path))
    try:
        from code import ConvertedModel  # type: ignore[attr-defined]  # noqa: F401
    except ImportError:
        pass  # 'code' clashes with the stdlib module name; import by path instead
    import importlib.util

    spec = importlib.util.spec_from_file_location("converted_code", code / "module.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    rebuilt = module.ConvertedModel()
    saved = torch.load(resnet_files["state"].with_name("resnet_sd.after.pt"), weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), saved.eval()(x))
    assert not any(t.is_meta for t in (*rebuilt.parameters(), *rebuilt.buffers()))
    # Each weight once: in state_dict.pt; the children fx pickles beside it carry no tensor data.
    blobs = [f for f in code.glob("*.pt") if f.name != "state_dict.pt"]
    assert blobs
    for blob in blobs:
        child = torch.load(blob, weights_only=False)
        assert all(t.is_meta for t in child.state_dict().values()), blob.name


def test_untraceable_model_converts_and_keeps_its_forward(tmp_path: Path) -> None:
    model, _ = build("untraceable-top")
    path = tmp_path / "checked.pt"
    torch.save(model, path)
    result = run("convert", path, "--allow-pickle", "--placement", "after", "--input-shape", "2,3,8,8")
    assert result.exit_code == 0, result.output
    assert "not traced" not in result.stdout  # recorded from a forward pass instead
    saved = torch.load(tmp_path / "checked.after.pt", weights_only=False)
    assert type(saved).__name__ == "CheckedNet"
    assert [p.placement for p in find_pairs(saved, (torch.randn(2, 3, 8, 8),))] == ["after", "after"]
    code = run(
        "convert",
        path,
        "--allow-pickle",
        "--placement",
        "after",
        "--code-dir",
        tmp_path / "c",
        "--force",
        "--input-shape",
        "2,3,8,8",
    )
    assert code.exit_code == 1 and "--code-dir needs a model whose whole forward traces" in code.stderr
    assert not (tmp_path / "c").exists()


def test_model_without_batchnorm(tmp_path: Path) -> None:
    model, _ = build("no-bn")
    path = tmp_path / "plain.pt"
    torch.save(model, path)
    result = run("inspect", path, "--allow-pickle")
    assert result.exit_code == 0 and "no BatchNorm found: nothing to move" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", "{pickled}"], 1, "pass --allow-pickle"),
        (["inspect", "{state}"], 1, "--arch package.module:callable"),
        (
            ["convert", "{pickled}", "--allow-pickle", "--placement", "sideways"],
            2,
            "Invalid value for '--placement'",
        ),
        (
            ["convert", "{pickled}", "--allow-pickle", "--placement", "after", "--method", "magic"],
            2,
            "Invalid value",
        ),
        (
            ["convert", "{pickled}", "--allow-pickle", "--placement", "after", "--input-shape", "1,5,8,8"],
            1,
            "forward raised RuntimeError on input 1x5x8x8",
        ),
        (
            ["convert", "{pickled}", "--allow-pickle", "--placement", "after", "--input-shape", "a,b"],
            1,
            "bad input shape",
        ),
        (
            ["convert", "{pickled}", "--allow-pickle", "--placement", "after", "-o", "/nonexistent/x.pt"],
            1,
            "does not exist",
        ),
        (["inspect", "missing.pt"], 1, "no such file"),
    ],
)
def test_errors_are_one_line(resnet_files: dict[str, Path], args: list[str], code: int, message: str) -> None:
    before = set(resnet_files["pickled"].parent.iterdir())
    argv = [a.format(**{k: str(v) for k, v in resnet_files.items()}) for a in args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if code == 1:
        assert len(messages(result.stderr)) == 1
    assert set(resnet_files["pickled"].parent.iterdir()) == before  # nothing written


def test_debug_shows_traceback(resnet_files: dict[str, Path]) -> None:
    from bnmove import LoadError

    with pytest.raises(LoadError):
        CliRunner().invoke(main, ["inspect", str(resnet_files["pickled"]), "--debug"], catch_exceptions=False)


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bnmove", "--help"], capture_output=True, text=True, check=True
    )
    assert "convert" in proc.stdout and "inspect" in proc.stdout


def test_outputs_keep_the_whole_stem_and_ordinary_permissions(tmp_path: Path) -> None:
    model, _ = build("mlp")
    path = tmp_path / "my.model.v2.after.pt"
    torch.save(model, path)
    os.chmod(path, 0o644)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 10)).astype("float32"))
    done = run("recalibrate", path, "--allow-pickle", "--calibration-data", tmp_path / "calib.npy")
    assert done.exit_code == 0, done.output
    out = tmp_path / "my.model.v2.after.recalibrated.pt"
    assert out.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not the 0600 of a temporary file
    converted = run("convert", path, "--allow-pickle", "--placement", "before", "--input-shape", "4,10")
    assert converted.exit_code == 0 and (tmp_path / "my.model.v2.after.before.pt").exists()


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = build("mlp")
    path = tmp_path / "mlp.pt"
    torch.save(model, path)

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bnmove.cli.model.convert", interrupted)
    result = run("convert", path, "--allow-pickle", "--placement", "after", "--input-shape", "4,10")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


@pytest.mark.parametrize("name", ["resnet", "preact"])
def test_format_pt2_loads_with_torch_alone(tmp_path: Path, name: str) -> None:
    """A torch.export program needs neither bnmove nor the model's code (kept affines, regenerated
    forwards included), and serves other batch and image sizes."""
    model, inputs = build(name)
    path = tmp_path / f"{name}.pt"
    torch.save(model, path)
    shape = ",".join(map(str, inputs[0].shape))
    done = run(
        "convert", path, "--allow-pickle", "--placement", "after", "--format", "pt2", "--input-shape", shape
    )
    assert done.exit_code == 0, done.output
    assert "the program takes any batch, height, width" in done.stderr
    out = tmp_path / f"{name}.after.pt2"
    channels, height, width = inputs[0].shape[1:]
    x = torch.randn(3, channels, height + 8, width + 4)  # another batch and image size: both stay dynamic
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model.eval()(x), tmp_path / "want.pt")
    code = (
        "import sys; sys.modules['bnmove'] = None; sys.modules['zoo'] = None\n"
        "import torch\n"
        f"m = torch.export.load({str(out)!r}).module()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "assert torch.allclose(m(x), want, atol=1e-5), (m(x) - want).abs().max()\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]


def test_sigterm_during_a_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = build("mlp")
    path = tmp_path / "mlp.pt"
    torch.save(model, path)
    real_save = torch.save

    def save_then_terminated(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)  # half-way: the temporary file exists now
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("bnmove.cli.model.torch.save", save_then_terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = run("convert", path, "--allow-pickle", "--placement", "after", "--input-shape", "4,10")
    assert result.exit_code == 143 and "terminated" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]  # no .mlp.after.pt.*.tmp left
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored


class PreTrainedModel(nn.Module):  # as transformers names its base class
    pass


PreTrainedModel.__module__ = "transformers.modeling_utils"


class HFLike(PreTrainedModel):
    """Stands in for a Hugging Face PreTrainedModel: it has save_pretrained."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.act = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.fc(x)))

    def save_pretrained(self, folder: str) -> None:  # pragma: no cover - never called
        raise NotImplementedError


def test_converting_an_hf_model_says_how_to_load_the_result(tmp_path: Path) -> None:
    path = tmp_path / "hf.pt"
    torch.save(HFLike().eval(), path)
    result = run("convert", path, "--allow-pickle", "--placement", "after", "--input-shape", "3,4")
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "from_pretrained builds the original placement" in said and "bnmove convert --format hf" in said
    assert said.count("save_pretrained") == 2  # one line, not a second note beside it


def test_identical_runs_write_identical_bytes(tmp_path: Path) -> None:
    model, _ = build("resnet")
    path = tmp_path / "r.pt"
    torch.save(model, path)
    digests = []
    for i in range(2):
        out = tmp_path / f"r{i}.pt"
        done = run(
            "convert", path, "--allow-pickle", "--placement", "after", "--input-shape", "2,3,8,8", "-o", out
        )
        assert done.exit_code == 0, done.output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_synthetic_fit_names_the_inferred_shape(tmp_path: Path) -> None:
    model, _ = build("mlp")
    path = tmp_path / "mlp.pt"
    torch.save(model, path)
    args = [
        "convert",
        path,
        "--allow-pickle",
        "--placement",
        "after",
        "--method",
        "fit",
        "--data-free",
        "synthetic",
    ]
    done = run(*args, "--calibration-samples", "8")
    assert done.exit_code == 0, done.output
    assert "synthetic inputs take the shape 10 inferred from the first layer" in " ".join(done.stderr.split())
    given = run(*args, "--calibration-samples", "8", "--input-shape", "4,10", "--force")
    assert given.exit_code == 0 and "inferred" not in given.stderr


def test_conversion_table_reads_at_80_columns() -> None:
    from rich.console import Console

    from bnmove import report
    from bnmove.sample_models import mobilenet, preact_resnet

    def render(result: bnmove.Conversion, width: int) -> list[str]:
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(report.conversion_table(result, width=width))
        return console.export_text().splitlines()

    x = torch.randn(2, 3, 32, 32)
    mobile = bnmove.convert(mobilenet(), "after", example_inputs=(x,))
    narrow, wide = render(mobile, 80), render(mobile, 160)
    assert all(len(line) <= 80 for line in narrow)
    text = "\n".join(narrow)
    # Names whole (a Sequential index is not shortened), the reasons readable, few lines per row.
    assert "blocks.1.block.1 → blocks.1.block.2" in text and "not adjacent to an" in text
    assert len(narrow) < 2.5 * len(mobile.moves) + 6
    assert " was " in wide[2] and " kind " in wide[2]  # the wide form keeps every column
    preact = bnmove.convert(preact_resnet(), "after", method="fit", example_inputs=(x,))
    assert "blocks.0.bn1 → act1 (ReLU)" in "\n".join(render(preact, 80))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(report.pairs_table(bnmove.find_pairs(preact_resnet()), width=80))
    lines = console.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any("blocks.1.bn1 → act1 (ReLU)" in line and "exact+affine" in line for line in lines)


def test_calibration_data_gives_the_example_input_when_no_shape_is_given(tmp_path: Path) -> None:
    """Without --input-shape, convert and export verify on the last calibration samples (held out
    of the fits) instead of a 224x224 guess the 8x8 model was never meant for."""
    from bnmove.sample_models import digits_net

    torch.manual_seed(0)
    model = digits_net().eval()
    path = tmp_path / "digits.pt"
    torch.save(model, path)
    calibration = np.random.default_rng(0).random((64, 1, 8, 8)).astype("float32")
    np.save(tmp_path / "calib.npy", calibration)
    data = ["--allow-pickle", "--method", "fit", "--calibration-data", str(tmp_path / "calib.npy")]
    done = run("convert", path, "--placement", "before", "--json", *data)
    assert done.exit_code == 0, done.output
    verification = json.loads(done.stdout)["verification"]
    assert verification["input_shapes"] == [[8, 1, 8, 8]]
    converted = torch.load(tmp_path / "digits.before.pt", weights_only=False).eval()
    x = torch.from_numpy(calibration[-8:])
    with torch.no_grad():
        error = (converted(x) - model(x)).abs().max().item()
    assert verification["max_abs_error"] == pytest.approx(error, rel=1e-3)
    exported = run("export", path, "-o", tmp_path / "variants", "--placements", "before", "--quiet", *data)
    assert exported.exit_code == 0, exported.output
    manifest = json.loads((tmp_path / "variants" / "manifest.json").read_text())
    assert manifest["example_input_shapes"] == [[8, 1, 8, 8]]


def test_with_stderr_in_a_file_each_stage_is_one_plain_line_and_quiet_prints_none(tmp_path: Path) -> None:
    """A real process, stderr redirected to a file as in CI or ``| tee``: no live bar can be drawn."""
    from bnmove.cli.bars import PROGRESS_LINE
    from bnmove.sample_models import digits_net

    torch.save(digits_net(), tmp_path / "net.pt")

    def export(*extra: str) -> list[str]:
        with (tmp_path / "stderr.log").open("w") as log:
            done = subprocess.run(
                [sys.executable, "-m", "bnmove", "export", "net.pt", "--allow-pickle", *extra],
                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log, timeout=300,
            )  # fmt: skip
        assert done.returncode == 0, (tmp_path / "stderr.log").read_text()
        return (tmp_path / "stderr.log").read_text().splitlines()

    lines = export("-o", "v", "--input-shape", "1,1,8,8")
    stages = [line for line in lines if PROGRESS_LINE.match(line)]
    assert [line.split(" [")[0] for line in stages] == [
        "bnmove: exporting original (0/3)",
        "bnmove: exporting before (1/3)",
        "bnmove: exporting after (2/3)",
    ]
    seconds = [float(line.rsplit("[", 1)[1].split(" s]")[0]) for line in stages]
    assert seconds == sorted(seconds)  # time since the display began
    assert export("-o", "q", "--input-shape", "1,1,8,8", "--quiet") == []

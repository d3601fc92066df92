"""The GPU report: what the placement variants cost on CUDA and TensorRT, in one Markdown file.

On a GPU machine it measures, within a time budget:

- ``compare`` of the original and the after-variant (exact, ``--fold-forward``) of three
  torchvision models (random weights; nothing is downloaded) at 224 px, batch 1 and 32:
  float on CUDA and on TensorRT, INT8 on CUDA (onnxruntime's CPU-form QDQ, which the CUDA
  provider emulates in float; labelled so) and on TensorRT (``--quantize int8-tensorrt``, INT8
  engines), each with its noise floor and every ratio's 95% interval;
- one epoch of the digits study (one seed, both placements) on CUDA, with bnmove's loop.

The report names the machine, the versions, how each provider timed and checked (TF32 allowed for
the timings, off for the deviations), and why a provider that does not work here did not run.
Steps not started before the budget ran out are listed as such, never dropped silently; the file is
rewritten after every step, so a run stopped from outside keeps what it measured.

    python benchmarks/gpu_report.py -o gpu-report.md          # on a GPU machine: at most --budget-s + a step
    python benchmarks/gpu_report.py --dry-run -o report.md    # the same code on the CPU, tiny sizes

It needs torch with CUDA, torchvision, and onnxruntime-gpu (its CUDA provider; TensorRT's libraries
for the TensorRT rows; ``pip install onnxruntime-gpu tensorrt-cu12``). TensorRT engines are cached
in ``--tensorrt-cache`` (default ``$XDG_CACHE_HOME/bnmove/tensorrt``): a second run skips the engine
builds, which take most of a first run's time. ``--dry-run`` runs every step on the CPU provider
with a small sample model at 32 px and batch 1 and 2 (the test suite runs it, so it cannot rot).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnmove
from bnmove import report
from bnmove.deploy import ExportOptions
from bnmove.deploy.comparison import Comparison
from bnmove.deploy.providers import _device_name, import_onnxruntime, provider_problem
from bnmove.sample_models import digits_net
from bnmove.sample_models import resnet as sample_resnet
from bnmove.study import Execution, Training

GPU_MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0")


@dataclass
class Settings:
    models: list[str]
    size: int
    batch_sizes: tuple[int, ...]
    providers: list[str]
    study_device: str
    iterations: int
    warmup: int
    calibration_samples: int


def settings(dry_run: bool) -> Settings:
    if dry_run:
        return Settings(["sample_resnet"], 32, (1, 2), ["cpu"], "cpu", 3, 1, 8)
    return Settings(list(GPU_MODELS), 224, (1, 32), ["cuda", "tensorrt"], "cuda", 50, 10, 32)


def build_model(name: str) -> nn.Module:
    if name == "sample_resnet":
        return sample_resnet().eval()
    import torchvision  # on the GPU machine only: not a dependency of bnmove

    return torchvision.models.get_model(name, weights=None).eval()


@dataclass
class Report:
    """The Markdown report, rewritten after every step."""

    path: Path
    header: list[str]
    sections: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        self.sections.append(text)
        self.write()

    def write(self) -> None:
        parts = [*self.header, *self.sections]
        if self.skipped:
            parts.append("## Not run\n\n" + "\n".join(f"- {s}" for s in self.skipped) + "\n")
        self.path.write_text("\n".join(parts))


def machine_lines(chosen: Settings) -> list[str]:
    ort = import_onnxruntime()
    import onnx

    lines = [
        "# bnmove GPU report",
        "",
        f"- created: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- bnmove {bnmove.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}",
        f"- GPU: {_device_name('cuda') if torch.cuda.is_available() else 'none visible to torch'}; "
        f"CPU: {_device_name('cpu')}",
    ]
    for provider in chosen.providers:
        problem = provider_problem(provider)
        lines.append(
            f"- provider {provider}: " + ("works" if problem is None else f"does not run here: {problem}")
        )
    return [*lines, ""]


def comparison_section(title: str, result: Comparison) -> str:
    """One compare: each variant's median latency and ratio with its interval, per batch size."""
    lines = [f"### {title}", "", report.comparison_header(result), ""]
    lines += [
        "| batch | variant | precision | p50 ms | ratio (95% CI) | max rel. deviation |",
        "|---:|---|---|---:|---:|---:|",
    ]
    precision = {v.name: v.precision for v in result.variants}
    deviation = {d.variant: d.max_rel for d in result.deviations}
    for t in result.timings:
        lines.append(
            f"| {t.batch_size} | {t.variant} | {precision[t.variant]} | {t.p50_ms:.3f} | "
            f"{t.ratio:.2f}× ({t.ratio_low:.2f}–{t.ratio_high:.2f}) | {deviation[t.variant]:.1e} |"
        )
    lines += ["", *report.provider_lines(result), *report.noise_lines(result)]
    note = report.deviation_note(result)
    return "\n".join([*lines, *([note] if note else []), ""])


def export_model(name: str, chosen: Settings, work: Path) -> dict[str, Path]:
    """The float variants and both INT8 forms, each in a folder compare reads."""
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(1, 3, chosen.size, chosen.size)
    calibration = bnmove.Calibration(torch.randn(chosen.calibration_samples, 3, chosen.size, chosen.size))
    folders = {}
    (work / name).mkdir()
    for kind, quantize in (("float", None), ("int8", "int8"), ("int8-tensorrt", "int8-tensorrt")):
        folder = work / name / kind
        paths = bnmove.export_variants(
            model,
            (x,),
            folder,
            ("original", "after"),
            stem=name,
            options=ExportOptions(fold="forward", quantize=quantize),
            calibration=calibration if quantize else None,
        )
        if quantize:  # compare reads folders: keep the INT8 files alone in theirs
            for variant in ("original", "after"):
                paths[variant].unlink()
        folders[kind] = folder
    return folders


def run(out: Path, dry_run: bool, budget_s: float, cache_dir: Path | None) -> Report:
    chosen = settings(dry_run)
    started = time.perf_counter()
    doc = Report(out, machine_lines(chosen))
    doc.write()

    def within_budget(step: str) -> bool:
        if time.perf_counter() - started < budget_s:
            print(f"[{time.perf_counter() - started:6.1f} s] {step}", file=sys.stderr, flush=True)
            return True
        doc.skipped.append(f"{step} (the {budget_s:.0f} s budget was spent)")
        doc.write()
        return False

    working = [p for p in chosen.providers if provider_problem(p) is None]
    with tempfile.TemporaryDirectory(prefix="bnmove-gpu-report-") as tmp:
        for name in chosen.models:
            if not within_budget(f"export {name}"):
                continue
            folders = export_model(name, chosen, Path(tmp))
            doc.add(f"## {name} at {chosen.size} px\n")
            for provider in working:
                int8 = "int8-tensorrt" if provider == "tensorrt" else "int8"
                for kind in ("float", int8):
                    step = f"compare {name}, {kind}, on {provider}"
                    if not within_budget(step):
                        continue
                    result = bnmove.compare(
                        [folders[kind]],
                        provider=provider,
                        batch_sizes=chosen.batch_sizes,
                        warmup=chosen.warmup,
                        iterations=chosen.iterations,
                        cache_dir=cache_dir,
                    )
                    doc.add(comparison_section(f"{kind} on {provider}", result))
    study_step = f"one epoch of the digits study on {chosen.study_device}"
    if chosen.study_device != "cuda" or torch.cuda.is_available():
        if within_budget(study_step):
            doc.add(study_section(chosen.study_device))
    else:
        doc.skipped.append(f"{study_step} (torch sees no CUDA GPU)")
        doc.write()
    doc.add(f"Total: {time.perf_counter() - started:.0f} s.\n")
    return doc


def study_section(device: str) -> str:
    started = time.perf_counter()
    result = bnmove.experiment(
        digits_net(),
        "digits",
        seeds=[0],
        training=Training(epochs=1, threads=1 if device == "cpu" else None),
        execution=Execution(device=device),
    )
    seconds = time.perf_counter() - started
    lines = [
        f"## One epoch of the digits study on {device}",
        "",
        f"{seconds:.1f} s in all; {result.precision}.",
        "",
    ]
    lines += ["| placement | val accuracy | seconds |", "|---|---:|---:|"]
    for key, metrics in result.metrics.items():
        lines.append(
            f"| {key} | {metrics['val_accuracy']:.1%} | {result.wall_seconds.get(key.split('/')[0], float('nan')):.1f} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-o", "--out", type=Path, default=Path("gpu-report.md"), help="the Markdown report to write"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="every step on the CPU at tiny sizes (seconds)"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no step after this many seconds")
    parser.add_argument("--tensorrt-cache", type=Path, help="where TensorRT engines are kept between runs")
    args = parser.parse_args(argv)
    doc = run(args.out, args.dry_run, args.budget_s, args.tensorrt_cache)
    print(f"wrote {doc.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

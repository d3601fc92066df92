"""``bnmove demo``: the whole tool on a bundled sample model, in one command.

Builds ``DigitsNet`` (BN before ReLU/Hardswish, after GELU, and a BatchNorm1d
head), trains it briefly on scikit-learn's digits when available, then:
inspect -> convert both ways with verification -> export the ONNX variants ->
compare them on the best onnxruntime provider -> a short before-vs-after
training experiment. Everything is written under one folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.rule import Rule
from torch import nn

from . import report
from .core.atomic import check_output_folder, save_module
from .core.running import eval_mode
from .deploy.export import Export, ExportOptions, export_variants
from .deploy.runtime import compare
from .errors import BnmoveError
from .pipeline.analyse import detect
from .pipeline.calibration import Calibration
from .pipeline.conversion import convert
from .sample_models import digits_net
from .study.data import Dataset, load_dataset
from .study.experiment import Training, experiment
from .study.loop import train_classifier
from .study.recipes import Recipe


def _digits() -> Dataset | None:
    try:
        return load_dataset("digits")
    except BnmoveError:
        return None


def _pretrain(model: torch.nn.Module, data: Dataset | None) -> str:
    """A few quick epochs so the demo converts a trained model (random BN statistics otherwise)."""
    torch.manual_seed(0)
    if data is None:
        with torch.no_grad():
            model.train()
            for _ in range(5):
                model(torch.rand(64, 1, 8, 8))
        model.eval()
        return "BN statistics warmed on random data (install scikit-learn for the digits data)"
    train_classifier(model, data, epochs=4)
    x, y = data.val.tensors()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    return f"trained 4 epochs on digits: {acc:.1%} validation accuracy"


def _agreement(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with eval_mode(a), eval_mode(b), torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).float().mean())


def run_demo(
    out_dir: Path,
    *,
    epochs: int = 3,
    force: bool = False,
    console: Console,
    progress_console: Console | None = None,
) -> list[Path]:
    """Run the demo into ``out_dir`` and print what it does; returns the files written."""
    check_output_folder(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise BnmoveError(f"{out_dir}: already exists; pass --force to reuse it, or -o for another folder")
    out_dir.mkdir(exist_ok=True)
    demo = _Demo(out_dir, console, progress_console or console, _digits(), epochs)
    model, written = demo.sample_model()
    demo.inspect(model)
    data = demo.data
    example = (data.val.head(8) if data is not None else torch.rand(8, 1, 8, 8),)
    written += demo.convert(model, example)
    exported = demo.export(model, example)
    written += [*exported.values(), exported.folder / "manifest.json"]
    written += demo.compare(exported)
    written += demo.experiment()
    console.print(Rule("files"))
    for path in written:
        console.print(f"  {path}", highlight=False)
    console.print("Next: try your own model, e.g. bnmove inspect model.pt --allow-pickle", highlight=False)
    return written


@dataclass(frozen=True)
class _Demo:
    """The demo's steps, each printed under its heading; ``status`` shows what runs meanwhile."""

    out_dir: Path
    console: Console
    status: Console
    data: Dataset | None
    epochs: int

    def sample_model(self) -> tuple[nn.Module, list[Path]]:
        self.console.print(Rule("1. a sample model"))
        torch.manual_seed(0)  # the same sample model, and the same figures, on every run
        model = digits_net()
        with self.status.status("training the sample model briefly…"):
            how = _pretrain(model, self.data)
        model_file = self.out_dir / "digits_net.pt"
        save_module(model, model_file)
        self.console.print(f"DigitsNet for 1x8x8 digit images, {how}; saved as {model_file}", highlight=False)
        return model, [model_file]

    def inspect(self, model: nn.Module) -> None:
        self.console.print(Rule("2. bnmove inspect"))
        found = detect(model)
        self.console.print(report.pairs_table(found.pairs, width=self.console.width))
        self.console.print(report.pairs_summary(found.pairs), highlight=False)

    def convert(self, model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[Path]:
        console, data, written = self.console, self.data, []
        console.print(Rule("3. bnmove convert, both ways, verified"))
        calibration = data.train.head(256) if data is not None else None
        for placement in ("after", "before"):
            # auto: exact everywhere (folded, or the BN's affine kept as a layer where nothing absorbs
            # it); a BN without running statistics would be fitted, here on 256 training digits.
            result = convert(
                model, placement, method="auto", example_inputs=example, calibration=Calibration(calibration)
            )
            path = self.out_dir / f"digits_net.{placement}.pt"
            save_module(result.model, path)
            written.append(path)
            console.print(report.conversion_table(result, width=console.width))
            line = report.conversion_summary(result)
            if data is not None:
                line += (
                    f"; top-1 agreement with the original on {len(data.val)} digits: "
                    f"{_agreement(model, result.model, data.val.head(len(data.val))):.1%}"
                )
            console.print(line, highlight=False)
        return written

    def export(self, model: nn.Module, example: tuple[torch.Tensor, ...]) -> Export:
        self.console.print(Rule("4. bnmove export (ONNX, --fold-forward)"))
        with self.status.status("exporting original, before and after variants…"):
            exported = export_variants(
                model,
                example,
                self.out_dir / "variants",
                stem="digits_net",
                options=ExportOptions(fold="forward"),
                force=True,
            )
        self.console.print(report.export_table(exported.manifest, width=self.console.width))
        return exported

    def compare(self, exported: Export) -> list[Path]:
        console = self.console
        console.print(Rule("5. bnmove compare (onnxruntime)"))
        with self.status.status("timing the variants…"):
            comparison = compare(
                exported, provider="auto", batch_sizes=(1, 64), warmup=3, iterations=30, data=self.data
            )  # with the digits, each variant's accuracy on the held-out ones (compare --data)
        console.print(report.comparison_table(comparison, width=console.width))
        if comparison.accuracies:
            console.print(report.accuracy_table(comparison))
        md = self.out_dir / "compare.md"
        md.write_text(report.comparison_markdown(comparison))
        if not report.has_matplotlib():
            return [md]
        report.comparison_plot(comparison, self.out_dir / "compare.png")
        return [md, self.out_dir / "compare.png"]

    def experiment(self) -> list[Path]:
        console = self.console
        console.print(Rule("6. bnmove experiment (before vs after, trained from scratch)"))
        if self.data is None:
            console.print("skipped: the experiment uses scikit-learn's digits (pip install scikit-learn)")
            return []
        with self.status.status(f"training before and after variants, {self.epochs} epochs x 2 seeds…"):
            result = experiment(
                digits_net(),
                self.data,
                seeds=2,
                training=Training(epochs=self.epochs, batch_size=64, recipe=Recipe("adam", lr=3e-3)),
            )
        console.print(report.experiment_header(result), highlight=False)
        console.print(report.experiment_table(result, width=console.width))
        for line in report.experiment_lines(result):
            console.print(line, highlight=False)
        return report.write_experiment(result, self.out_dir / "experiment")

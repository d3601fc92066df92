"""Deployment commands: ``export`` the variants to ONNX, ``compare`` them under onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.atomic import atomic_path, check_output, check_output_folder
from ..deploy.export import DEFAULT_OPSET, ExportOptions, FoldForm, export_variants, require_export_tools
from ..deploy.providers import PROVIDERS
from ..deploy.quantize import QUANTIZATIONS, check_quantization
from ..deploy.runtime import compare
from ..errors import BnmoveError
from ..fitting.calibrate import calibration_batches
from ..pipeline.calibration import Calibration
from ..pipeline.plan import METHODS
from ..report import (
    accuracy_table,
    comparison_csv,
    comparison_json,
    comparison_markdown,
    comparison_ops_lines,
    comparison_plot,
    comparison_table,
    deviation_note,
    export_table,
    int8_lines,
    noise_lines,
    provider_lines,
    require_matplotlib,
)
from ..study.data import load_dataset
from ._common import (
    ModelArgs,
    _csv_list,
    _stdout,
    calibration_options,
    debug_option,
    main,
    model_options,
    quiet_option,
)
from .bars import _progress


@main.command(
    name="export",
    epilog="""\b
Example:
  bnmove export model.pt --allow-pickle -o variants --fold-forward""",
)
@model_options
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Folder for <stem>.<variant>.onnx files and manifest.json (created if missing).",
)
@click.option(
    "--placements",
    default="original,before,after",
    show_default=True,
    help="Variants to export, comma-separated.",
)
@click.option(
    "--method",
    default="auto",
    show_default=True,
    type=click.Choice(METHODS),
    help="How the before/after variants are converted (see bnmove convert --help).",
)
@click.option(
    "--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(13, 23), help="ONNX opset."
)
@calibration_options(
    "Real inputs for fitted moves (see bnmove convert --help); held-out figures go into the manifest."
)
@click.option(
    "--max-error",
    type=click.FloatRange(min=0.0),
    metavar="X",
    help="Fail (exit 1, nothing written) when a moved variant's outputs change by more than X (relative).",
)
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension (dynamic by default).")
@click.option(
    "--fold-forward",
    is_flag=True,
    help="Fold BNs that follow their activation into the next Linear/Conv where exact without extra work "
    "(through pooling and flatten; convs that pad with zeros need --fold-padded).",
)
@click.option(
    "--fold-padded",
    is_flag=True,
    help="--fold-forward, and also fold BNs into zero-padded convs: scaled weights plus a constant "
    "border correction (an Add after the Conv). Exact at every size; whether it is faster than the "
    "standalone BN depends on the runtime (see docs/guide/deployment.md).",
)
@click.option(
    "--fold-auto",
    is_flag=True,
    help="Export each variant unfolded, with --fold-forward and with --fold-padded, time the forms "
    "that differ on onnxruntime's CPU provider, and keep the fastest (all are exact); the manifest "
    "records each form's time.",
)
@click.option(
    "--quantize",
    type=click.Choice(QUANTIZATIONS),
    help="Also write <stem>.<variant>.int8.onnx beside each float variant: onnxruntime's static "
    "quantization (QDQ, per-channel weights), calibrated on --calibration-data (required) with its "
    "last samples held out to measure the agreement with the float variant. int8: uint8 "
    "activations, fast on onnxruntime's CPU provider; int8-tensorrt: signed symmetric int8, the "
    "form TensorRT builds.",
)
@click.option("--force", is_flag=True, help="Overwrite existing variant files in the folder.")
@quiet_option
def export_command(
    model: ModelArgs,
    as_json: bool,
    out_dir: Path,
    placements: str,
    method: str,
    calibration_path: Path | None,
    calibration_samples: int,
    max_error: float | None,
    opset: int,
    static_batch: bool,
    fold_forward: bool,
    fold_padded: bool,
    fold_auto: bool,
    quantize: str | None,
    force: bool,
    quiet: bool,
) -> None:
    """Export original, before and after variants to checked ONNX.

    Every file passes onnx.checker and onnxruntime's outputs match PyTorch's for the same
    variant; manifest.json records moves, shapes, sizes, hashes and the measured error.
    """
    variants = _csv_list(placements, "variant")
    fold = _fold_form(fold_forward, fold_padded, fold_auto)
    check_output_folder(out_dir)  # before loading and converting, which can take minutes
    require_export_tools()
    check_quantization(quantize, calibration_path is not None)
    loaded = model.load()
    calibration = (
        calibration_batches(calibration_path, samples=calibration_samples)
        if calibration_path is not None
        else None
    )
    inputs = model.inputs(loaded, calibration, calibration_path)
    with _progress(as_json or quiet) as progress:
        task = progress.add_task("exporting", total=len(variants))
        exported = export_variants(
            loaded.module,
            inputs,
            out_dir,
            variants,
            method=method,
            calibration=Calibration(calibration, calibration_samples),
            options=ExportOptions(
                fold=fold,
                quantize=quantize,
                opset=opset,
                static_batch=static_batch,
            ),
            stem=model.stem,
            force=force,
            max_error=max_error,
            on_progress=progress.follow(task),
        )
        progress.update(task, completed=len(variants))
    manifest = exported.manifest
    for warning in exported.warnings():
        click.echo(f"bnmove: warning: {warning}", err=True)
    for note in exported.notes():
        click.echo(f"bnmove: note: {note}", err=True)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    out = _stdout()
    out.print(export_table(manifest, width=out.width), highlight=False)
    for line in int8_lines(manifest):
        out.print(line, highlight=False)
    out.print(
        f"wrote {len(exported)} variants and {out_dir / 'manifest.json'}; next: bnmove compare {out_dir}",
        highlight=False,
        soft_wrap=True,
    )


@main.command(
    name="compare",
    epilog="""\b
Example:
  bnmove compare variants --batch-sizes 1,8 --markdown report.md""",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="DIR_OR_FILES...")
@click.option(
    "--provider",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", *PROVIDERS]),
    help="auto picks the best that works here: TensorRT, then CUDA, then CPU.",
)
@click.option(
    "--batch-sizes", default="1,8,32", show_default=True, help="Batch sizes to time, comma-separated."
)
@click.option(
    "--warmup",
    default=5,
    show_default=True,
    type=click.IntRange(0),
    help="Untimed runs per variant and batch size.",
)
@click.option("--iterations", type=click.IntRange(1), help="Timed rounds per batch size [default: 50].")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    help="Time each batch size for this long instead.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout (no table).")
@click.option("--json-file", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option(
    "--csv", "csv_path", type=click.Path(path_type=Path), help="Write one CSV row per variant and batch size."
)
@click.option("--markdown", "md_path", type=click.Path(path_type=Path), help="Write a Markdown report.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    help="Write a PNG of latency and throughput vs batch size.",
)
@click.option(
    "--data",
    "data_spec",
    metavar="DATA",
    help="Labelled data to measure each variant's top-1 accuracy on, with a 95% interval and its "
    "paired difference from the original: what experiment --data takes ('digits', an .npz with "
    "x/y, an image folder, a CIFAR folder); its validation split (x_val/y_val or val/ when given, "
    "else the 20% experiment holds out).",
)
@click.option(
    "--data-samples",
    type=click.IntRange(1),
    metavar="N",
    help="Use at most the first N samples of --data [default: all].",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="CPU only: onnxruntime's threads for the timings [default: per batch size, the faster of 1 "
    "and every core, measured on the original: on busy cores, threads that wait for each other cost "
    "more than one].",
)
@click.option(
    "--tensorrt-cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="TensorRT only: keep engines and timing caches here, so later runs skip the engine builds "
    "[default: $XDG_CACHE_HOME/bnmove/tensorrt].",
)
@click.option("--force", is_flag=True, help="Overwrite existing report files.")
@quiet_option
@debug_option
def compare_command(
    paths: tuple[Path, ...],
    provider: str,
    batch_sizes: str,
    warmup: int,
    iterations: int | None,
    seconds: float | None,
    as_json: bool,
    json_path: Path | None,
    csv_path: Path | None,
    md_path: Path | None,
    plot_path: Path | None,
    data_spec: str | None,
    data_samples: int | None,
    threads: int | None,
    cache_dir: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    """Time ONNX variants side by side under onnxruntime.

    Variants run interleaved, round by round; on GPU with inputs and outputs bound on the device.
    Reports latency percentiles, throughput, the ratio to the original, output deviation and the
    nodes left after onnxruntime's optimisations (which BatchNorms survived fusion); with
    --data, each variant's accuracy on your labelled data.
    """
    if iterations is not None and seconds is not None:
        raise click.UsageError("give --iterations or --seconds, not both")
    try:
        sizes = [int(b) for b in _csv_list(batch_sizes, "batch size")]
    except ValueError:
        raise click.BadParameter(
            f"{batch_sizes!r} is not a comma-separated list of integers", param_hint="--batch-sizes"
        ) from None
    reports = [p for p in (json_path, csv_path, md_path, plot_path) if p is not None]
    for path in reports:
        check_output(path, force=force)
    if plot_path is not None:
        require_matplotlib()
    data = load_dataset(data_spec) if data_spec is not None else None  # bad data fails before timing
    for note in data.notes if data is not None else []:
        click.echo(f"bnmove: note: {note}", err=True)
    with _progress(as_json or quiet) as progress:
        task = progress.add_task("comparing", total=None)
        result = compare(
            list(paths),
            provider=provider,
            batch_sizes=sizes,
            warmup=warmup,
            iterations=None if seconds is not None else (iterations or 50),
            seconds=seconds,
            on_progress=progress.follow(task),
            data=data,
            data_samples=data_samples,
            cache_dir=cache_dir,
            threads=threads,
        )
    writers = ((json_path, comparison_json), (csv_path, comparison_csv), (md_path, comparison_markdown))
    for target, render in writers:
        if target is None:
            continue
        with atomic_path(target) as tmp:
            tmp.write_text(render(result))
    if plot_path is not None:
        comparison_plot(result, plot_path)
    if as_json:
        click.echo(comparison_json(result), nl=False)
        return
    out = _stdout()
    out.print(comparison_table(result, width=out.width))
    if result.accuracies:
        out.print(accuracy_table(result))
    deviating = deviation_note(result)
    if deviating:
        out.print(f"[yellow]{deviating}[/]", highlight=False)
    for line in provider_lines(result):
        out.print(line, highlight=False)
    for line in noise_lines(result):
        out.print(
            f"[yellow]{line}[/]" if line.startswith("the machine is too noisy") else line, highlight=False
        )
    for line in comparison_ops_lines(result):
        out.print(f"  {line}", highlight=False)
    if reports:
        out.print("wrote " + ", ".join(str(p) for p in reports), highlight=False, soft_wrap=True)


def _fold_form(forward: bool, padded: bool, auto: bool) -> FoldForm:
    if auto and (forward or padded):
        raise BnmoveError("--fold-auto chooses between the folds itself: give it alone")
    return "auto" if auto else "padded" if padded else "forward" if forward else "none"

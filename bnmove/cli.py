"""Command line: parsing and calling the library only; errors become one line and exit 1."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from ._atomic import atomic_path, check_output
from .calibrate import calibration_batches, recalibrate
from .codegen import require_graph_module, write_code_folder
from .conversion import DATA_FREE, METHODS, convert
from .data import load_dataset
from .demo import run_demo
from .detect import PLACEMENTS, detect
from .errors import BnmoveError
from .experiment import EpochRecord, experiment
from .export import DEFAULT_OPSET, export_variants, read_manifest
from .loading import LoadedModel, load_model, parse_arch_args
from .report import (
    comparison_csv,
    comparison_json,
    comparison_markdown,
    comparison_ops_lines,
    comparison_plot,
    comparison_table,
    conversion_summary,
    conversion_table,
    experiment_json,
    experiment_table,
    export_table,
    has_matplotlib,
    pairs_summary,
    pairs_table,
    require_matplotlib,
    untraced_lines,
    write_experiment,
)
from .runtime import PROVIDERS, compare
from .verify import infer_example_inputs, inputs_from_shapes, parse_input_shape

_DEBUG_KEY = "bnmove.debug"


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.find_root().meta[_DEBUG_KEY] = True
    return value


class BnmoveGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BnmoveError as exc:
            if ctx.meta.get(_DEBUG_KEY) or os.environ.get("BNMOVE_DEBUG"):
                raise
            click.echo(f"bnmove: error: {exc}", err=True)
            ctx.exit(1)
        except Exception as exc:
            if ctx.meta.get(_DEBUG_KEY) or os.environ.get("BNMOVE_DEBUG"):
                raise
            click.echo(
                f"bnmove: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                err=True,
            )
            ctx.exit(1)


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="Show full tracebacks instead of one-line errors.",
)


@dataclass(frozen=True)
class ModelArgs:
    """The model file and how to read it: what every model-reading command shares."""

    path: Path
    arch: str | None
    arch_args: tuple[str, ...]
    allow_pickle: bool
    imports: tuple[str, ...]
    input_shapes: tuple[str, ...]

    def load(self) -> LoadedModel:
        return load_model(
            self.path,
            arch=self.arch,
            arch_kwargs=parse_arch_args(self.arch_args),
            allow_pickle=self.allow_pickle,
            imports=self.imports,
        )

    def given_inputs(self, loaded: LoadedModel) -> tuple[torch.Tensor, ...] | None:
        """Example inputs from --input-shape, if given."""
        if not self.input_shapes:
            return None
        return inputs_from_shapes(loaded.module, [parse_input_shape(s) for s in self.input_shapes])

    def inputs(self, loaded: LoadedModel) -> tuple[torch.Tensor, ...]:
        """Example inputs from --input-shape, else inferred from the first layer."""
        return self.given_inputs(loaded) or infer_example_inputs(loaded.module)

    @property
    def stem(self) -> str:
        return self.path.name.split(".")[0]


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that reads a model file shares; the command receives them as ``model``."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        model_path: Path,
        arch: str | None,
        arch_args: tuple[str, ...],
        allow_pickle: bool,
        imports: tuple[str, ...],
        input_shapes: tuple[str, ...],
        **kwargs: Any,
    ) -> Any:
        model = ModelArgs(model_path, arch, arch_args, allow_pickle, imports, input_shapes)
        return fn(*args, model=model, **kwargs)

    decorators = [
        click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path)),
        click.option(
            "--arch",
            metavar="MODULE:CALLABLE",
            help="Architecture for a state-dict file, e.g. mymodels:resnet18 (a class or factory).",
        ),
        click.option(
            "--arch-arg",
            "arch_args",
            multiple=True,
            metavar="NAME=VALUE",
            help="Keyword argument for --arch (repeatable), e.g. --arch-arg num_classes=10.",
        ),
        click.option(
            "--allow-pickle",
            is_flag=True,
            help="Allow loading a whole pickled module. Unpickling runs code from the file: only for files you trust.",
        ),
        click.option(
            "--import",
            "imports",
            multiple=True,
            metavar="MODULE",
            help="Import MODULE first so pickled classes or --arch resolve (repeatable).",
        ),
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="SHAPE",
            help="Example input shape, e.g. 1,3,224,224 (repeat for several inputs). Default: inferred from the first layer.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
        debug_option,
    ]
    wrapped: Callable[..., Any] = command
    for decorator in reversed(decorators):
        wrapped = decorator(wrapped)
    return wrapped


def _stdout() -> Console:
    # Piped output is read by grep and people's logs: give tables room instead of folding names.
    return Console(width=None if sys.stdout.isatty() else 160)


def _stderr() -> Console:
    return Console(stderr=True)


@click.group(cls=BnmoveGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnmove")
@debug_option
def main() -> None:
    """Move BatchNorm before or after its activation in a trained PyTorch model.

    \b
    bnmove inspect model.pt --allow-pickle          list BN–activation pairs
    bnmove convert model.pt --placement after       move every BN after its activation

    MODEL is a state dict (.pt/.pth, give --arch) or a pickled module
    (needs --allow-pickle: unpickling runs code from the file).
    """
    logging.basicConfig(level=logging.WARNING, format="bnmove: %(message)s")


@main.command()
@model_options
def inspect(
    model: ModelArgs,
    as_json: bool,
) -> None:
    """List every BatchNorm–activation pair: placement, whether it can move, and whether exactly."""
    loaded = model.load()
    result = detect(loaded.module, model.given_inputs(loaded))
    if as_json:
        payload = {
            "model": str(model.path),
            "pairs": [p.to_dict() for p in result.pairs],
            "untraced": [u.__dict__ for u in result.untraced],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    out = _stdout()
    if result.pairs:
        out.print(pairs_table(result.pairs))
    for line in untraced_lines(result.untraced):
        out.print(f"[yellow]{line}[/]", highlight=False)
    out.print(pairs_summary(result.pairs), highlight=False)


@main.command(name="convert")
@model_options
@click.option(
    "--placement",
    required=True,
    type=click.Choice(PLACEMENTS),
    help="Where BN goes: 'before' (BN -> activation) or 'after' (activation -> BN).",
)
@click.option(
    "--method",
    default="auto",
    show_default=True,
    type=click.Choice(METHODS),
    help="exact: only moves that keep eval outputs (BN folded into the neighbouring Conv/Linear); "
    "fit: move every pair and fit the new BN so the block reproduces the old one (data-free, or from "
    "--calibration-data); swap: reorder only, parameters untouched; auto: exact where possible, fit elsewhere.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file. Default: <stem>.<placement>.pt beside MODEL.",
)
@click.option(
    "--calibration-data",
    "calibration_path",
    type=click.Path(path_type=Path),
    help="Real inputs for fitting: .pt/.pth tensors (loaded weights-only), .npy, .npz, or a folder of them.",
)
@click.option(
    "--calibration-samples",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Use at most this many calibration samples.",
)
@click.option(
    "--no-refit", is_flag=True, help="With calibration data, do not re-fit the layer after each fitted pair."
)
@click.option(
    "--data-free",
    default="gaussian",
    show_default=True,
    type=click.Choice(DATA_FREE),
    help="How to fit without --calibration-data. gaussian: per channel, from each BN's own statistics "
    "(instant). synthetic: make --calibration-samples inputs whose statistics match every BN's "
    "(shape from --input-shape), then fit on them like real data: seconds to minutes, far closer "
    "to the original.",
)
@click.option(
    "--code-dir",
    type=click.Path(path_type=Path),
    help="Also write the converted model as readable Python code plus weights into this folder.",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert_command(
    model: ModelArgs,
    as_json: bool,
    placement: str,
    method: str,
    output: Path | None,
    calibration_path: Path | None,
    calibration_samples: int,
    no_refit: bool,
    data_free: str,
    code_dir: Path | None,
    force: bool,
) -> None:
    """Move every movable BatchNorm before or after its activation and save the model.

    The saved file is a whole module: load it with torch.load(OUT, weights_only=False).
    """
    output = output or model.path.with_name(f"{model.path.stem}.{placement}.pt")
    check_output(output, force=force, inputs=(model.path,))
    if code_dir is not None:
        check_output(code_dir, force=force, inputs=(model.path,))
    loaded = model.load()
    calibration = (
        calibration_batches(calibration_path, samples=calibration_samples)
        if calibration_path is not None
        else None
    )
    inputs = model.inputs(loaded)
    with _progress(sys.stderr.isatty() and not as_json) as progress:
        task = progress.add_task("converting", total=None)

        def on_progress(done: int, total: int) -> None:
            what = "making synthetic inputs" if done < total else "fitting"
            progress.update(task, description=what, completed=done, total=total)

        result = convert(
            loaded.module,
            placement,
            method=method,
            example_inputs=inputs,
            calibration_data=calibration,
            calibration_samples=calibration_samples,
            refit_next=not no_refit,
            data_free=data_free,
            on_progress=on_progress,
        )
    # Traced before anything is written, so an untraceable model fails cleanly.
    code_model = require_graph_module(result.model) if code_dir is not None else None
    with atomic_path(output) as tmp:
        torch.save(result.model, tmp)
    if code_dir is not None and code_model is not None:
        write_code_folder(code_model, code_dir)
    if as_json:
        click.echo(
            json.dumps(
                {**result.to_dict(), "output": str(output), "code_dir": str(code_dir) if code_dir else None},
                indent=2,
            )
        )
        return
    out = _stdout()
    out.print(conversion_table(result))
    for line in untraced_lines(result.untraced):
        out.print(f"[yellow]{line}[/]", highlight=False)
    out.print(conversion_summary(result), highlight=False)
    out.print(f"wrote {output}" + (f" and {code_dir}/" if code_dir else ""), highlight=False)


@main.command(name="recalibrate")
@model_options
@click.option(
    "--calibration-data",
    "calibration_path",
    required=True,
    type=click.Path(path_type=Path),
    help=".pt/.pth tensors (loaded weights-only), .npy, .npz, or a folder of them.",
)
@click.option(
    "--calibration-samples", type=click.IntRange(1), help="Use at most this many samples (default: all)."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file. Default: <stem>.recalibrated.pt beside MODEL.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def recalibrate_command(
    model: ModelArgs,
    as_json: bool,
    calibration_path: Path,
    calibration_samples: int | None,
    output: Path | None,
    force: bool,
) -> None:
    """Re-estimate every BatchNorm's running statistics as exact averages over the data.

    BatchNorms see the data in train mode (as in training) while every other layer stays in
    eval mode (dropout off); nothing else changes. Useful after a swap or a fit.
    """
    output = output or model.path.with_name(f"{model.stem}.recalibrated.pt")
    check_output(output, force=force, inputs=(model.path,))
    loaded = model.load()
    batches = calibration_batches(calibration_path, samples=calibration_samples or 10**12)
    show = sys.stderr.isatty() and not as_json
    with _progress(show) as progress:
        task = progress.add_task("recalibrating", total=len(batches))
        recalibrated = recalibrate(loaded.module, batches, on_batch=lambda: progress.advance(task))
    with atomic_path(output) as tmp:
        torch.save(recalibrated, tmp)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in recalibrated.modules())
    samples = sum(len(b[0]) for b in batches)
    if as_json:
        click.echo(json.dumps({"output": str(output), "batchnorms": bns, "samples": samples}))
        return
    _stdout().print(f"re-estimated {bns} BatchNorms over {samples} samples; wrote {output}", highlight=False)


def _csv_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}")
    return items


@main.command(name="export")
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
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension (dynamic by default).")
@click.option(
    "--fold-forward",
    is_flag=True,
    help="Fold BNs that follow their activation into the next Linear/unpadded Conv where exact.",
)
@click.option("--force", is_flag=True, help="Overwrite existing variant files in the folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export_command(
    model: ModelArgs,
    as_json: bool,
    out_dir: Path,
    placements: str,
    method: str,
    opset: int,
    static_batch: bool,
    fold_forward: bool,
    force: bool,
    quiet: bool,
) -> None:
    """Export the original, before and after variants to ONNX, each checked against PyTorch.

    Every file passes onnx.checker and onnxruntime's outputs match PyTorch's for the same
    variant; manifest.json records moves, shapes, sizes, hashes and the measured error.
    """
    variants = _csv_list(placements, "variant")
    loaded = model.load()
    inputs = model.inputs(loaded)
    show = sys.stderr.isatty() and not (as_json or quiet)
    with Progress(transient=True, console=_stderr(), disable=not show) as progress:
        task = progress.add_task("exporting", total=len(variants))

        def advance(variant: str) -> None:
            progress.update(task, description=f"exporting {variant}", completed=variants.index(variant))

        paths = export_variants(
            loaded.module,
            inputs,
            out_dir,
            variants,
            method=method,
            opset=opset,
            static_batch=static_batch,
            fold_forward_bns=fold_forward,
            stem=model.stem,
            force=force,
            on_variant=advance,
        )
        progress.update(task, completed=len(variants))
    manifest = read_manifest(out_dir) or {}
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    out = _stdout()
    out.print(export_table(manifest), highlight=False)
    out.print(
        f"wrote {len(paths)} variants and {out_dir / 'manifest.json'}; next: bnmove compare {out_dir}",
        highlight=False,
    )


@main.command(name="compare")
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
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON ('-' for stdout)."
)
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
@click.option("--force", is_flag=True, help="Overwrite existing report files.")
@debug_option
def compare_command(
    paths: tuple[Path, ...],
    provider: str,
    batch_sizes: str,
    warmup: int,
    iterations: int | None,
    seconds: float | None,
    json_path: Path | None,
    csv_path: Path | None,
    md_path: Path | None,
    plot_path: Path | None,
    force: bool,
) -> None:
    """Time exported variants side by side under onnxruntime and compare their outputs.

    Variants run interleaved, round by round; on GPU with inputs and outputs bound on the device.
    Reports latency percentiles, throughput, the ratio to the original, output deviation and the
    nodes left after onnxruntime's optimisations (which BatchNorms survived fusion).
    """
    if iterations is not None and seconds is not None:
        raise click.UsageError("give --iterations or --seconds, not both")
    try:
        sizes = [int(b) for b in _csv_list(batch_sizes, "batch size")]
    except ValueError:
        raise click.BadParameter(
            f"{batch_sizes!r} is not a comma-separated list of integers", param_hint="--batch-sizes"
        ) from None
    reports = [p for p in (json_path, csv_path, md_path, plot_path) if p is not None and str(p) != "-"]
    for path in reports:
        check_output(path, force=force)
    if plot_path is not None:
        require_matplotlib()
    to_stdout = json_path is not None and str(json_path) == "-"
    show = sys.stderr.isatty() and not to_stdout
    with _stderr().status("comparing…") if show else contextlib.nullcontext() as status:

        def step(text: str) -> None:
            if status is not None:
                status.update(text)

        result = compare(
            list(paths),
            provider=provider,
            batch_sizes=sizes,
            warmup=warmup,
            iterations=None if seconds is not None else (iterations or 50),
            seconds=seconds,
            on_step=step,
        )
    writers = ((json_path, comparison_json), (csv_path, comparison_csv), (md_path, comparison_markdown))
    for target, render in writers:
        if target is None or str(target) == "-":
            continue
        with atomic_path(target) as tmp:
            tmp.write_text(render(result))
    if plot_path is not None:
        comparison_plot(result, plot_path)
    if to_stdout:
        click.echo(comparison_json(result), nl=False)
        return
    out = _stdout()
    out.print(comparison_table(result))
    for line in comparison_ops_lines(result):
        out.print(f"  {line}", highlight=False)
    if reports:
        out.print("wrote " + ", ".join(str(p) for p in reports), highlight=False)


def _check_outputs(out_dir: Path, names: Sequence[str], force: bool) -> None:
    """Refuse to overwrite files in ``out_dir`` without ``force``; checked before any work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BnmoveError(f"{out_dir}: exists and is not a folder")
    if not out_dir.parent.is_dir():
        raise BnmoveError(f"{out_dir}: folder {out_dir.parent} does not exist")
    for name in names:
        if (out_dir / name).exists() and not force:
            raise BnmoveError(f"{out_dir / name}: already exists; pass --force to overwrite")


def _progress(show: bool) -> Progress:
    """The progress bar every long command shows on stderr: what, bar, done/total, time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_stderr(),
        transient=True,
        disable=not show,
    )


def _epoch_progress(show: bool, total: int) -> tuple[Progress, Callable[[str, int, int, EpochRecord], None]]:
    progress = _progress(show)
    task = progress.add_task("training", total=total)

    def on_epoch(variant: str, seed: int, epoch: int, record: EpochRecord) -> None:
        progress.update(
            task,
            advance=1,
            description=(f"{variant} seed {seed} epoch {epoch}: val acc {record.val_accuracy:.1%}"),
        )

    return progress, on_epoch


@main.command(name="experiment")
@model_options
@click.option(
    "--data",
    "data_spec",
    required=True,
    metavar="DATA",
    help="'digits' (scikit-learn's 8x8 digits), an .npz with x/y (and optionally x_val/y_val), or a folder of them.",
)
@click.option(
    "--placements", default="before,after", show_default=True, help="Variants to train, comma-separated."
)
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option(
    "--seeds", default=3, show_default=True, type=click.IntRange(1), help="Seeds (runs) per variant."
)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(2))
@click.option(
    "--lr",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Adam learning rate.",
)
@click.option(
    "--val-split",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Held-out fraction when the data has no x_val/y_val.",
)
@click.option(
    "--from-pretrained",
    is_flag=True,
    help="Fine-tune from the model's weights (converted exactly where possible) instead of a fresh initialisation.",
)
@click.option("--device", help="Training device (default: cuda when available, else cpu).")
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Folder for results.json, summary.md and curves.png. Default: experiment-<model stem>.",
)
@click.option("--force", is_flag=True, help="Overwrite existing result files.")
def experiment_command(
    model: ModelArgs,
    as_json: bool,
    data_spec: str,
    placements: str,
    epochs: int,
    seeds: int,
    batch_size: int,
    lr: float,
    val_split: float,
    from_pretrained: bool,
    device: str | None,
    out_dir: Path | None,
    force: bool,
) -> None:
    """Train each BN placement of MODEL the same way and compare them: "before or after?" on your data.

    Every variant of a seed starts from the same weights and sees the same batches in the same
    order with the same optimiser; results are mean ± std over seeds.
    """
    # The data decides the input shape; --input-shape is not used here.
    variants = _csv_list(placements, "placement")
    out_dir = out_dir or Path(f"experiment-{model.stem}")
    plot = has_matplotlib()
    _check_outputs(out_dir, ["results.json", "summary.md", "curves.png"], force)
    loaded = model.load()
    data = load_dataset(data_spec, val_split=val_split)
    show = sys.stderr.isatty() and not as_json
    progress, on_epoch = _epoch_progress(show, epochs * seeds * len(variants))
    with progress:
        result = experiment(
            loaded.module,
            data,
            placements=variants,
            epochs=epochs,
            seeds=seeds,
            batch_size=batch_size,
            lr=lr,
            from_pretrained=from_pretrained,
            device=device,
            on_epoch=on_epoch,
        )
    written = write_experiment(result, out_dir)
    if as_json:
        click.echo(experiment_json(result), nl=False)
        return
    out = _stdout()
    out.print(experiment_table(result))
    out.print(
        "wrote "
        + ", ".join(str(p) for p in written)
        + ("" if plot else " (no plot: pip install matplotlib)"),
        highlight=False,
    )


@main.command(name="demo")
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    default=Path("bnmove-demo"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder for everything the demo writes.",
)
@click.option(
    "--epochs", default=3, show_default=True, type=click.IntRange(1), help="Epochs of the short experiment."
)
@click.option("--force", is_flag=True, help="Reuse an existing demo folder, overwriting its files.")
@debug_option
def demo_command(out_dir: Path, epochs: int, force: bool) -> None:
    """Show bnmove end to end on a bundled sample model, no arguments needed.

    Inspects it, converts it both ways with verification, exports the variants to ONNX,
    compares them on the best available onnxruntime provider, and runs a short
    before-vs-after training experiment on scikit-learn's digits when it is installed.
    """
    run_demo(out_dir, epochs=epochs, force=force, console=_stdout(), progress_console=_stderr())


if __name__ == "__main__":  # pragma: no cover
    main()

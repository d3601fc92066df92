"""Commands on one model: ``inspect``, ``convert``, ``recalibrate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import click
import torch

from ..analysis.detect import PLACEMENTS
from ..core.atomic import atomic_path, check_output, save_module
from ..deploy.folding import fold_forward
from ..deploy.program import save_program
from ..errors import BnmoveError
from ..fitting.calibrate import calibration_batches, recalibrate
from ..io.codegen import require_graph_module, write_code_folder
from ..io.pretrained import is_pretrained_model, save_pretrained
from ..pipeline.analyse import detect
from ..pipeline.calibration import DATA_FREE, Calibration, DataFree
from ..pipeline.conversion import SAVE_PRETRAINED, convert
from ..pipeline.plan import METHODS
from ..report import (
    conversion_summary,
    conversion_table,
    deploy_summary,
    deploy_table,
    pairs_summary,
    pairs_table,
    untraced_lines,
)
from ._common import (
    ModelArgs,
    _stdout,
    calibration_options,
    main,
    model_options,
    quiet_option,
)
from .bars import _progress


@main.command(
    epilog="""\b
Example:
  bnmove inspect model.pt --allow-pickle --input-shape 1,3,224,224"""
)
@model_options
@click.option(
    "--deploy",
    type=click.Choice(["forward", "padded"]),
    help="Also show what export does with each BN of this model with these folds "
    "(export --fold-forward / --fold-padded): fused, folded into which layer, removed, or left, and why.",
)
def inspect(
    model: ModelArgs,
    as_json: bool,
    deploy: str | None,
) -> None:
    """List BatchNorm–activation pairs and whether each can move.

    One row per BatchNorm: its activation, its placement (before or after), how it would move
    (exact fold, exact with a kept affine, or fit) and, for one that cannot, why. convert and
    export carry out exactly this. With --deploy, what export's folds do with each BN of the
    model as it is (inspect a converted file to see its variant's).
    """
    loaded = model.load()
    inputs = model.given_inputs(loaded)  # a shape the model rejects fails there, in one line
    result = detect(loaded.module, inputs)
    folding = fold_forward(loaded.module, padded=deploy == "padded") if deploy else None
    if as_json:
        payload: dict[str, Any] = {
            "model": str(model.path),
            "pairs": [p.to_dict() for p in result.pairs],
            "untraced": [u.__dict__ for u in result.untraced],
        }
        if folding is not None:
            payload["deploy"] = {"fold": deploy, **folding.manifest()}
        click.echo(json.dumps(payload, indent=2))
        return
    out = _stdout()
    if result.pairs:
        out.print(pairs_table(result.pairs, width=out.width))
    for line in untraced_lines(result.untraced):
        out.print(f"[yellow]{line}[/]", highlight=False)
    out.print(pairs_summary(result.pairs), highlight=False)
    if folding is not None:
        out.print(deploy_table(folding.bns, f"Deployed with --fold-{deploy}", width=out.width))
        out.print(deploy_summary(folding.bns), highlight=False)


@main.command(
    name="convert",
    epilog="""\b
Examples:
  bnmove convert model.pt --allow-pickle --placement after
  bnmove convert weights.pt --arch torchvision:resnet18 --placement after \\
      --method fit --calibration-data samples.npy""",
)
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
    help="exact: moves that keep eval outputs (BN folded into the neighbouring Conv/Linear, or its affine map "
    "kept as a ChannelAffine layer where none absorbs it); fit: move every pair and fit the new BN so the "
    "block reproduces the old one, no extra layer (data-free, or from --calibration-data); swap: reorder "
    "only, parameters untouched; auto: exact wherever the BN has running statistics, fit elsewhere.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file. Default: <stem>.<placement>.pt beside MODEL.",
)
@calibration_options(
    "Real inputs for fitting: .pt/.pth tensors (loaded weights-only), .npy, .npz, or a folder of them."
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
@click.option(
    "--format",
    "out_format",
    type=click.Choice(["pt", "pt2", "hf"]),
    default="pt",
    show_default=True,
    help="pt: the whole module, torch.save (your model's class; load with torch.load(..., weights_only=False)). "
    "pt2: a torch.export program, loadable with torch alone and no code (torch.export.load(OUT).module()), "
    "for eval-mode inference, its batch and spatial size dynamic where the model allows. "
    "hf (Hugging Face models): a save_pretrained folder that "
    "AutoModelFor...from_pretrained(OUT, trust_remote_code=True) loads in the converted placement.",
)
@click.option(
    "--max-error",
    type=click.FloatRange(min=0.0),
    metavar="X",
    help="Fail (exit 1, nothing written) when a fitted or swapped conversion changes the outputs by more "
    "than X relative to their largest magnitude: on the held-out calibration samples when given, else on "
    "the example input. Without it a large change is a warning naming the pairs that caused it.",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@quiet_option
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
    out_format: str,
    max_error: float | None,
    force: bool,
    quiet: bool,
) -> None:
    """Move every BN before or after its activation and save the model.

    The saved file is a whole module: load it with torch.load(OUT, weights_only=False); with
    --format pt2 a torch.export program: torch.export.load(OUT).module().
    """
    suffix = "" if out_format == "hf" else f".{out_format}"  # a folder
    output = output or model.path.with_name(f"{model.stem}.{placement}{suffix}")
    check_output(output, force=force, inputs=(model.path,))
    if code_dir is not None:
        check_output(code_dir, force=force, inputs=(model.path,))
    loaded = model.load()
    if out_format == "hf" and not is_pretrained_model(loaded.module):
        raise BnmoveError(
            f"--format hf writes a save_pretrained folder, and {type(loaded.module).__name__} is not "
            "a Hugging Face transformers model; use --format pt or pt2"
        )
    calibration = (
        calibration_batches(calibration_path, samples=calibration_samples)
        if calibration_path is not None
        else None
    )
    inputs = model.inputs(loaded, calibration, calibration_path)
    if method == "fit" and data_free == "synthetic" and calibration is None and not model.input_shapes:
        shape = "x".join(map(str, inputs[0].shape[1:]))
        click.echo(
            f"bnmove: note: synthetic inputs take the shape {shape} inferred from the first layer; "
            "their cost grows with it, so give --input-shape with your real size",
            err=True,
        )
    with _progress(as_json or quiet) as progress:
        task = progress.add_task("converting", total=None)
        result = convert(
            loaded.module,
            placement,
            method=method,
            example_inputs=inputs,
            calibration=Calibration(
                calibration, calibration_samples, not no_refit, cast(DataFree, data_free)
            ),
            on_progress=progress.follow(task),
            max_error=max_error,
        )
    for warning in result.warnings:
        if not (out_format == "hf" and warning == SAVE_PRETRAINED):  # the folder is what it asks for
            click.echo(f"bnmove: warning: {warning}", err=True)
    # Traced before anything is written, so an untraceable model fails cleanly.
    code_model = require_graph_module(result.model) if code_dir is not None else None
    if out_format == "pt2":
        with atomic_path(output) as tmp:
            dynamic = save_program(result.model, inputs, tmp)
        shape = "x".join(map(str, inputs[0].shape))
        if "batch" not in dynamic:
            click.echo(
                "bnmove: note: the model fixes its batch size; the program is exported for it", err=True
            )
        fixed = "any " + ", ".join(dynamic) if dynamic else f"only {shape}"
        click.echo(f"bnmove: note: the program takes {fixed} (the example input is {shape})", err=True)
    elif out_format == "hf":
        save_pretrained(result.model, output)
    else:
        save_module(result.model, output)
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
    out.print(conversion_table(result, width=out.width))
    for line in untraced_lines(result.untraced):
        out.print(f"[yellow]{line}[/]", highlight=False)
    out.print(conversion_summary(result), highlight=False)
    out.print(f"wrote {output}" + (f" and {code_dir}/" if code_dir else ""), highlight=False, soft_wrap=True)


@main.command(
    name="recalibrate",
    epilog="""\b
Example:
  bnmove recalibrate tuned.pt --allow-pickle --calibration-data train.npy""",
)
@model_options
@calibration_options(
    ".pt/.pth tensors (loaded weights-only), .npy, .npz, or a folder of them.", required=True, samples=None
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file. Default: <stem>.recalibrated.pt beside MODEL.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@quiet_option
def recalibrate_command(
    model: ModelArgs,
    as_json: bool,
    calibration_path: Path,
    calibration_samples: int | None,
    output: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    """Recompute BatchNorm running statistics exactly over data.

    BatchNorms see the data in train mode (as in training) while every other layer stays in
    eval mode (dropout off); nothing else changes. Useful after a swap or a fit.
    """
    output = output or model.path.with_name(f"{model.stem}.recalibrated.pt")
    check_output(output, force=force, inputs=(model.path,))
    loaded = model.load()
    batches = calibration_batches(calibration_path, samples=calibration_samples or 10**12)
    model.inputs(loaded, batches, calibration_path)  # data the model rejects: one line naming it, first
    with _progress(as_json or quiet) as progress:
        task = progress.add_task("recalibrating", total=len(batches))
        recalibrated = recalibrate(loaded.module, batches, on_progress=progress.follow(task))
    save_module(recalibrated, output)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in recalibrated.modules())
    samples = sum(len(b[0]) for b in batches)
    if as_json:
        click.echo(json.dumps({"output": str(output), "batchnorms": bns, "samples": samples}))
        return
    _stdout().print(
        f"re-estimated {bns} BatchNorms over {samples} samples; wrote {output}",
        highlight=False,
        soft_wrap=True,
    )

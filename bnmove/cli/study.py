"""The training command: ``experiment`` (before or after, on your data)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import torch
from click.core import ParameterSource
from torch import nn

from ..errors import BnmoveError
from ..report import (
    experiment_header,
    experiment_json,
    experiment_lines,
    experiment_table,
    has_matplotlib,
    write_experiment,
)
from ..study.activations import replace_activations
from ..study.checks import match_classes
from ..study.data import load_dataset
from ..study.experiment import Execution, Training, experiment
from ..study.jobs import finished_runs
from ..study.recipes import RECIPES, Recipe
from ._common import (
    ModelArgs,
    _check_outputs,
    _csv_list,
    _stdout,
    main,
    model_options,
    quiet_option,
)
from .bars import _StudyProgress


@main.command(
    name="experiment",
    epilog="""\b
Examples:
  bnmove experiment net.pt --allow-pickle --data digits --epochs 3
  bnmove experiment net.pt --allow-pickle --import train \\
      --run "python train.py --model {model} --seed {seed} --out {out}\"""",
)
@model_options
@click.option(
    "--data",
    "data_spec",
    metavar="DATA",
    help="Data for bnmove's training loop (not with --run): 'digits' (scikit-learn's 8x8 digits), an .npz with x/y (and optionally x_val/y_val) or a folder of "
    "them, an image folder (train/<class>/*.png|jpg and val/<class>/..., or <class>/... split by --val-split; "
    "needs Pillow), or a CIFAR-10/100 'python version' folder.",
)
@click.option(
    "--run",
    "command",
    metavar="COMMAND",
    help="Train with your own script instead of bnmove's loop: a shell command run once per variant "
    "and seed, with {model} (the variant's file: torch.load(path, weights_only=False)), {seed}, {out} "
    "(the run's folder), {device} and {variant} filled in. It reports metrics as JSON in "
    "{out}/metrics.json or as the last JSON line it prints; see --metric.",
)
@click.option(
    "--metric",
    metavar="NAME",
    help="With --run: the reported metric to compare the placements on [default: val_accuracy].",
)
@click.option(
    "--higher-is-better/--lower-is-better",
    default=True,
    show_default=True,
    help="With --run: which direction of --metric is better (--lower-is-better for a loss).",
)
@click.option(
    "--placements", default="before,after", show_default=True, help="Variants to train, comma-separated."
)
@click.option(
    "--activations",
    metavar="KINDS",
    help="Also vary the activation: comma-separated kinds (relu, gelu, silu, tanh, hardswish, mish, elu, "
    "leaky_relu, relu6, sigmoid). Every stateless activation module of the model is replaced by each kind "
    "in turn and crossed with the placements and seeds; results go to DIR/<kind>/. Activations called as "
    "functions in forward code are left as they are (listed on stderr).",
)
@click.option(
    "--epochs", default=5, show_default=True, type=click.IntRange(1), help="Epochs of bnmove's loop per run."
)
@click.option(
    "--seeds", default=3, show_default=True, type=click.IntRange(1), help="Seeds (runs) per variant."
)
@click.option(
    "--batch-size",
    default=64,
    show_default=True,
    type=click.IntRange(2),
    help="Mini-batch size of bnmove's loop.",
)
@click.option(
    "--recipe",
    default="adam",
    show_default=True,
    type=click.Choice(RECIPES),
    help="adam: Adam, constant learning rate. sgd: SGD (momentum 0.9, Nesterov, weight decay 5e-4), "
    "linear warm-up over 5% of steps, then cosine decay (the usual CIFAR ResNet recipe). adamw: AdamW "
    "(weight decay 0.05), the same schedule. Weight decay never applies to BatchNorm parameters or biases.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    help="Learning rate [default: 1e-3 for adam and adamw, 0.1 for sgd].",
)
@click.option(
    "--weight-decay",
    type=click.FloatRange(min=0),
    help="Weight decay on weights [default: 0 for adam, 5e-4 for sgd, 0.05 for adamw].",
)
@click.option("--label-smoothing", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option(
    "--augment/--no-augment",
    default=False,
    show_default=True,
    help="Random crop (zero padding of 1/8 of the side) and horizontal flip of image batches; the same "
    "draws for every placement of a seed. Off by default: flips suit photos, not digits or text.",
)
@click.option(
    "--image-size",
    type=click.IntRange(1),
    metavar="PIXELS",
    help="Scale images of an image folder to cover this square size and crop its centre (no distortion) "
    "[default: the first image's size, which every image must have].",
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
@click.option(
    "--precise-bn",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    metavar="SAMPLES",
    help="Before each evaluation, recompute every BatchNorm's statistics exactly on this many training "
    "samples (precise BN) instead of using the running averages, which lag behind fast-moving weights: "
    "most of all right after a conversion (--from-pretrained). 0: off.",
)
@click.option("--device", help="Training device (default: cuda when available, else cpu).")
@click.option(
    "--devices",
    metavar="LIST",
    help="Spread the runs over these devices, one run per device at a time (cuda:0,cuda:1,...).",
)
@click.option(
    "--jobs",
    type=click.IntRange(1),
    help="Runs at once, each in its own worker process [default: one per device of --devices, else 1]. "
    "On a CPU the cores are shared out between them.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="CPU threads for bnmove's loop, one run at a time [default: the faster of 1 and every core, "
    "measured on a training step: on busy cores, threads that wait for each other cost more than one].",
)
@click.option(
    "--backend",
    default="local",
    show_default=True,
    type=click.Choice(["local", "ray"]),
    help="local: this machine. ray: each run a task on the Ray cluster that ray.init() finds (RAY_ADDRESS "
    "names one; else one started on this machine); needs pip install 'bnmove[ray]' here and bnmove on "
    "every node.",
)
@click.option(
    "--amp/--no-amp",
    default=None,
    help="Mixed precision (bfloat16 autocast; float16 with loss scaling on GPUs without bfloat16) "
    "[default: on for CUDA, off on the CPU].",
)
@click.option(
    "--channels-last/--no-channels-last",
    default=None,
    help="The channels-last memory layout for image models [default: on for CUDA, off on the CPU].",
)
@click.option(
    "--deterministic",
    is_flag=True,
    help="Deterministic kernels only, so a re-run on CUDA repeats bit for bit (slower there, by how "
    "much depends on the model). On the CPU, give --threads too.",
)
@click.option(
    "-o",
    "--output-dir",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Folder for results.json, summary.md and curves.png. Default: experiment-<model stem>.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Start over: discard the runs kept for resuming and overwrite the result files. Without it, a "
    "study resumes, and a finished one re-reports from its records (new seeds or placements train only "
    "what is new).",
)
@quiet_option
@click.pass_context
def experiment_command(
    ctx: click.Context,
    model: ModelArgs,
    as_json: bool,
    data_spec: str | None,
    command: str | None,
    metric: str | None,
    higher_is_better: bool,
    placements: str,
    activations: str | None,
    epochs: int,
    seeds: int,
    batch_size: int,
    recipe: str,
    lr: float | None,
    weight_decay: float | None,
    label_smoothing: float,
    augment: bool,
    image_size: int | None,
    val_split: float,
    from_pretrained: bool,
    precise_bn: int,
    device: str | None,
    devices: str | None,
    jobs: int | None,
    threads: int | None,
    backend: str,
    amp: bool | None,
    channels_last: bool | None,
    deterministic: bool,
    out_dir: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    """Train each BN placement the same way and compare them.

    Every variant of a seed starts from the same weights; with bnmove's loop (--data) it sees the
    same batches in the same order with the same optimiser. With --run, your own script trains
    each variant. Placements are compared by their paired difference per seed, with a 95%
    interval. Finished runs are kept in DIR/jobs: an interrupted study resumes, a finished one
    re-reports at once, and more seeds, placements or activations train only what is new.
    """
    given = {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if command is not None:
        loop_only = sorted(given & _LOOP_OPTIONS)
        if data_spec is not None or loop_only:
            name = "--data" if data_spec is not None else "--" + loop_only[0].replace("_", "-")
            raise BnmoveError(f"{name} is for bnmove's training loop; with --run your script trains")
    else:
        if data_spec is None:
            raise BnmoveError("give --data for bnmove's training loop, or --run for your own training")
        if model.input_shapes:  # the data decides the input shape: say so rather than ignore the option
            raise BnmoveError("experiment takes its input shape from --data; leave out --input-shape")
        if metric not in (None, "val_accuracy") or not higher_is_better:
            raise BnmoveError(
                "--metric and --lower-is-better are for --run; bnmove's loop compares val_accuracy"
            )
    if device and devices:
        raise BnmoveError("give --device or --devices, not both")
    variants = _csv_list(placements, "placement")
    out_dir = out_dir or Path(f"experiment-{model.stem}")
    plot = has_matplotlib()
    kinds = _csv_list(activations, "activation") if activations else []
    folders = {kind: out_dir / kind for kind in kinds} or {"": out_dir}
    files = ["results.json", "summary.md", "curves.png"]
    # a study folder (it keeps its runs) re-reports from them; other files are not overwritten
    fresh = [kind for kind, folder in folders.items() if force or not (folder / "jobs").is_dir()]
    _check_outputs(out_dir, [f"{kind}/{name}" if kind else name for kind in fresh for name in files], force)
    loaded = model.load()
    data = None
    example: tuple[torch.Tensor, ...]
    if data_spec is not None:
        data = load_dataset(data_spec, val_split=val_split, image_size=image_size)
        for note in data.notes:
            click.echo(f"bnmove: note: {note}", err=True)
        base, reset = match_classes(loaded.module, data)
        if reset:
            click.echo(f"bnmove: note: {reset}", err=True)
        example = (data.sample(2),)
    else:
        base, example = loaded.module, model.inputs(loaded)
    models: dict[str, nn.Module] = {"": base}
    if kinds:
        models = {}
        for kind in kinds:
            swapped = replace_activations(base, kind, example)
            models[kind] = swapped.model
            click.echo(
                f"bnmove: note: {kind}: replaced {len(swapped.replaced)} activation modules"
                + (f"; left as they are: {', '.join(swapped.left)}" if swapped.left else ""),
                err=True,
            )
    job_dirs = {kind: folders[kind] / "jobs" for kind in models}
    if force:
        for folder in job_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)  # --force starts over
    done = sum(finished_runs(folder, variants, list(range(seeds))) for folder in job_dirs.values())
    total = seeds * len(variants) * len(models)
    if done == total:
        click.echo(
            f"bnmove: note: all {total} runs are done in {out_dir}: reporting from their records", err=True
        )
    elif done:
        click.echo(f"bnmove: note: resuming: {done} of {total} runs are done in {out_dir}", err=True)
    device_list = _csv_list(devices, "device") if devices else None
    steps = 0 if command is not None else epochs
    results = {}
    with _StudyProgress(as_json or quiet, (steps or 1) * max(total - done, 1), steps) as progress:
        for kind, net in models.items():
            progress.prefix = f"{kind} " if kind else ""
            results[kind] = experiment(
                net,
                data,
                placements=variants,
                seeds=seeds,
                from_pretrained=from_pretrained,
                on_progress=progress.on_progress,
                train=command,
                metric=metric,
                higher_is_better=higher_is_better,
                example_inputs=example,
                training=None
                if command
                else Training(
                    epochs=epochs,
                    batch_size=batch_size,
                    recipe=Recipe(recipe, lr, weight_decay, label_smoothing, augment),
                    threads=threads,
                    amp=amp,
                    channels_last=channels_last,
                    deterministic=deterministic,
                    precise_bn=precise_bn,
                ),
                execution=Execution(
                    device=device, devices=device_list, jobs=jobs, backend=backend, jobs_dir=job_dirs[kind]
                ),
            )
    written = []
    for kind, result in results.items():
        written += write_experiment(result, folders[kind])
    if as_json:
        if kinds:
            payload = {kind: json.loads(experiment_json(result)) for kind, result in results.items()}
            click.echo(json.dumps({"activations": payload}, indent=2))
        else:
            click.echo(experiment_json(results[""]), nl=False)
        return
    out = _stdout()
    for kind, result in results.items():
        if kind:
            out.print(f"\n[bold]activation: {kind}[/]")
        out.print(experiment_header(result), highlight=False)
        out.print(experiment_table(result, width=out.width))
        for line in experiment_lines(result):
            out.print(line, highlight=False, soft_wrap=True)  # verdicts whole, as the files hold them
    out.print(
        "wrote "
        + ", ".join(str(p) for p in written)
        + ("" if plot else " (no plot: pip install matplotlib)"),
        highlight=False,
        soft_wrap=True,  # paths whole: the terminal wraps them, rich would cut them anywhere
    )


#: options that only bnmove's own training loop reads (refused with --run)
_LOOP_OPTIONS = {
    "epochs", "batch_size", "recipe", "lr", "weight_decay", "label_smoothing", "augment", "image_size",
    "val_split", "precise_bn", "amp", "channels_last", "threads", "deterministic",
}  # fmt: skip

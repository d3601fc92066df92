"""Command line: parsing and calling the library only; errors become one line and exit 1."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console

from . import __version__
from ._atomic import atomic_path, check_output
from .codegen import require_graph_module, write_code_folder
from .conversion import METHODS, convert
from .detect import PLACEMENTS, detect
from .errors import BnmoveError
from .loading import LoadedModel, load_model, parse_arch_args
from .report import conversion_summary, conversion_table, pairs_summary, pairs_table, untraced_lines
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


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options every command that reads a model file shares."""
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
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def _load(
    model_path: Path, arch: str | None, arch_args: Sequence[str], allow_pickle: bool, imports: Sequence[str]
) -> LoadedModel:
    return load_model(
        model_path,
        arch=arch,
        arch_kwargs=parse_arch_args(arch_args),
        allow_pickle=allow_pickle,
        imports=imports,
    )


def _inputs(loaded: LoadedModel, shapes: Sequence[str]) -> tuple[torch.Tensor, ...]:
    if shapes:
        return inputs_from_shapes(loaded.module, [parse_input_shape(s) for s in shapes])
    return infer_example_inputs(loaded.module)


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
    model_path: Path,
    arch: str | None,
    arch_args: tuple[str, ...],
    allow_pickle: bool,
    imports: tuple[str, ...],
    input_shapes: tuple[str, ...],
    as_json: bool,
) -> None:
    """List every BatchNorm–activation pair: placement, whether it can move, and whether exactly."""
    loaded = _load(model_path, arch, arch_args, allow_pickle, imports)
    inputs = (
        inputs_from_shapes(loaded.module, [parse_input_shape(s) for s in input_shapes])
        if input_shapes
        else None
    )
    result = detect(loaded.module, inputs)
    if as_json:
        payload = {
            "model": str(model_path),
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
    "swap: reorder only, parameters untouched; auto: exact where possible, swap elsewhere.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file. Default: <stem>.<placement>.pt beside MODEL.",
)
@click.option(
    "--code-dir",
    type=click.Path(path_type=Path),
    help="Also write the converted model as readable Python code plus weights into this folder.",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert_command(
    model_path: Path,
    arch: str | None,
    arch_args: tuple[str, ...],
    allow_pickle: bool,
    imports: tuple[str, ...],
    input_shapes: tuple[str, ...],
    as_json: bool,
    placement: str,
    method: str,
    output: Path | None,
    code_dir: Path | None,
    force: bool,
) -> None:
    """Move every movable BatchNorm before or after its activation and save the model.

    The saved file is a whole module: load it with torch.load(OUT, weights_only=False).
    """
    output = output or model_path.with_name(f"{model_path.stem}.{placement}.pt")
    check_output(output, force=force, inputs=(model_path,))
    if code_dir is not None:
        check_output(code_dir, force=force, inputs=(model_path,))
    loaded = _load(model_path, arch, arch_args, allow_pickle, imports)
    inputs = _inputs(loaded, input_shapes)
    with (
        _stderr().status("converting…", spinner="dots")
        if sys.stderr.isatty() and not as_json
        else contextlib.nullcontext()
    ):
        result = convert(loaded.module, placement, method=method, example_inputs=inputs)
    if code_dir is not None:
        require_graph_module(result.model)  # fail before writing anything
    with atomic_path(output) as tmp:
        torch.save(result.model, tmp)
    if code_dir is not None:
        write_code_folder(result.model, code_dir)
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


if __name__ == "__main__":  # pragma: no cover
    main()

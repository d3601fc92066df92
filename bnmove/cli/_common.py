"""What every command shares: the group, its one-line errors, model options, consoles, progress."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console

from ..analysis.inputs import infer_example_inputs
from ..core.atomic import check_output_folder
from ..core.running import eval_mode, inputs_from_shapes, run_model
from ..errors import BnmoveError, ModelRunError
from ..io.loading import LoadedModel, load_model, parse_arch_args

_DEBUG_KEY = "bnmove.debug"


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    parts = text.replace("x", ",").replace(" ", "").strip(",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BnmoveError(f"bad input shape {text!r}: expected integers like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise BnmoveError(f"bad input shape {text!r}: every dimension must be a positive integer")
    return shape


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.find_root().meta[_DEBUG_KEY] = True
    return value


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so every ``finally`` (atomic writes) runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """While a command runs, SIGTERM unwinds the stack instead of killing the process mid-write."""
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class BnmoveGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (tracebacks only with --debug)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _terminate_cleanly():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            # Ctrl-C: the shell's convention (128 + SIGINT), and nothing half-written (atomic writes).
            click.echo("bnmove: interrupted", err=True)
            ctx.exit(130)
        except Terminated:
            click.echo("bnmove: terminated", err=True)
            ctx.exit(143)  # 128 + SIGTERM
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
    state_dict_key: str | None = None

    def load(self) -> LoadedModel:
        loaded = load_model(
            self.path,
            arch=self.arch,
            arch_kwargs=parse_arch_args(self.arch_args),
            allow_pickle=self.allow_pickle,
            imports=self.imports,
            state_dict_key=self.state_dict_key,
        )
        for note in loaded.notes:
            click.echo(f"bnmove: note: {self.path}: {note}", err=True)
        return loaded

    def given_inputs(self, loaded: LoadedModel) -> tuple[torch.Tensor, ...] | None:
        """Example inputs from --input-shape, if given; a shape the model rejects fails here, in one
        line, before any work (the model runs once on it)."""
        if not self.input_shapes:
            return None
        inputs = inputs_from_shapes(loaded.module, [parse_input_shape(s) for s in self.input_shapes])
        with eval_mode(loaded.module):
            run_model(loaded.module, inputs)
        return inputs

    def inputs(
        self,
        loaded: LoadedModel,
        calibration: Sequence[tuple[torch.Tensor, ...]] | None = None,
        calibration_path: Path | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Example inputs from --input-shape, else the last calibration samples (up to 8, among
        those a fit holds out), else inferred from the first layer. Calibration samples the
        model rejects fail here, in one line that names the data (before any work)."""
        given = self.given_inputs(loaded)
        if given:
            return given
        if calibration:
            samples = tuple(t[-8:] for t in calibration[-1])
            try:
                with eval_mode(loaded.module):
                    run_model(loaded.module, samples)
            except ModelRunError as exc:
                shape = " and ".join("x".join(map(str, t.shape[1:])) for t in samples)
                where = f" {calibration_path}" if calibration_path else ""
                raise BnmoveError(
                    f"the model rejects the calibration data{where} (samples of shape {shape}): "
                    f"{str(exc).split(': ', 1)[-1]}"
                ) from exc
            return samples
        return infer_example_inputs(loaded.module)

    @property
    def stem(self) -> str:
        """The input's name without its last suffix: ``my.model.v2.after.pt`` -> ``my.model.v2.after``."""
        return self.path.stem


def calibration_options(
    data_help: str, *, required: bool = False, samples: int | None = 256
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--calibration-data`` (as ``calibration_path``) and ``--calibration-samples``, for every
    command that reads calibration data; ``samples``: the default count (None: all)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn = click.option(
            "--calibration-samples",
            default=samples,
            show_default=samples is not None,
            type=click.IntRange(1),
            help="Use at most this many calibration samples" + ("." if samples else " [default: all]."),
        )(fn)
        return click.option(
            "--calibration-data",
            "calibration_path",
            required=required,
            type=click.Path(path_type=Path),
            help=data_help,
        )(fn)

    return decorate


#: what `model_options` declares (each use makes its own click parameters from these)
_MODEL_OPTIONS = [
    click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path)),
    click.option(
        "--arch",
        metavar="MODULE:CALLABLE",
        help="Architecture for a state-dict file: package.module:callable (a class or factory), "
        "or timm:NAME / torchvision:NAME for a library model built with random weights.",
    ),
    click.option(
        "--state-dict-key",
        metavar="KEY",
        help="The checkpoint entry holding the weights, e.g. state_dict_ema "
        "(default: the file itself, or its state_dict/model/... entry).",
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
        state_dict_key: str | None,
        **kwargs: Any,
    ) -> Any:
        model = ModelArgs(model_path, arch, arch_args, allow_pickle, imports, input_shapes, state_dict_key)
        return fn(*args, model=model, **kwargs)

    wrapped: Callable[..., Any] = command
    for decorator in reversed(_MODEL_OPTIONS):
        wrapped = decorator(wrapped)
    return wrapped


def _stdout() -> Console:
    # Piped output is read by grep and people's logs: give tables room instead of folding names,
    # unless COLUMNS says how wide (rich reads it).
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if wide else 160)


def _stderr() -> Console:
    return Console(stderr=True)


@click.group(
    cls=BnmoveGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="""\b
Examples:
  bnmove inspect model.pt --allow-pickle
  bnmove convert model.pt --allow-pickle --placement after""",
)
@click.version_option(package_name="bnmove", prog_name="bnmove")
@debug_option
def main() -> None:
    """Move BatchNorm before or after its activation in a PyTorch model.

    MODEL is a state dict (.pt/.pth/.safetensors, give --arch), a Hugging Face
    save_pretrained folder, or a pickled module (needs --allow-pickle: unpickling
    runs code from the file). Run bnmove demo for a tour on a sample model.
    """
    logging.basicConfig(level=logging.WARNING, format="bnmove: %(message)s")


def _csv_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}")
    return items


def _check_outputs(out_dir: Path, names: Sequence[str], force: bool) -> None:
    """Refuse to overwrite files in ``out_dir`` without ``force``; checked before any work."""
    check_output_folder(out_dir)
    for name in names:
        if (out_dir / name).exists() and not force:
            raise BnmoveError(f"{out_dir / name}: already exists; pass --force to overwrite")


#: --quiet, as every long command takes it
quiet_option = click.option(
    "--quiet",
    is_flag=True,
    help="No progress (a live bar on a terminal; else one plain line per stage on stderr).",
)

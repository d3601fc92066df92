"""``bnmove demo``: every stage on a bundled sample model."""

from __future__ import annotations

from pathlib import Path

import click

from ..demo import run_demo
from ._common import _stderr, _stdout, debug_option, main


@main.command(
    name="demo",
    epilog="""\b
Example:
  bnmove demo -o bnmove-demo --epochs 3""",
)
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
    """Show bnmove end to end on a bundled sample model.

    Inspects it, converts it both ways with verification, exports the variants to ONNX,
    compares them on the best available onnxruntime provider, and runs a short
    before-vs-after training experiment on scikit-learn's digits when it is installed.
    """
    run_demo(out_dir, epochs=epochs, force=force, console=_stdout(), progress_console=_stderr())

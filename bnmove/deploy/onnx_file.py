"""One ONNX file: exported from a module and checked against PyTorch under onnxruntime."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.fidelity import difference
from ..core.running import eval_mode, output_tensors, run_model
from ..errors import BnmoveError
from .providers import import_onnxruntime

if TYPE_CHECKING:  # onnx costs 0.7 s to import: only the commands that export load it
    import onnx


log = logging.getLogger(__name__)

DEFAULT_OPSET = 18


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The exporter prints progress and warnings; a library should not."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def root_cause(exc: BaseException) -> str:
    """The innermost error of a chain, in one line: the exporter wraps the real cause in a banner."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _ort_session(path: Path) -> Any:
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def value_shape(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else int(d.dim_value) for d in dims]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    path: Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
) -> None:
    """Export ``model`` (in eval mode) to ``path`` with the torch.export-based exporter."""
    example_inputs, dynamic_shapes = _batch_args(example_inputs, dynamic_batch)
    with eval_mode(model), quiet_export():
        try:
            program = torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        except Exception as exc:
            raise BnmoveError(f"ONNX export failed: {root_cause(exc)}") from exc
        assert program is not None
        program.save(str(path))


def _batch_args(
    example_inputs: Sequence[torch.Tensor], dynamic_batch: bool
) -> tuple[list[torch.Tensor], tuple[dict[int, Any], ...] | None]:
    """Inputs and ``dynamic_shapes`` for torch.export with a dynamic batch dimension (or none)."""
    inputs = list(example_inputs)
    if not dynamic_batch:
        return inputs, None
    batch = torch.export.Dim("batch", min=1, max=65536)
    # torch.export specialises size-1 dimensions, so a batch of 1 cannot stay dynamic.
    inputs = [x.expand(2, *x.shape[1:]).clone() if x.shape[0] == 1 else x for x in inputs]
    return inputs, tuple({0: batch} for _ in inputs)


def check_against_torch(
    model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path
) -> tuple[float, float]:
    """``onnx.checker`` the file and return (max abs error, max |torch output|) vs PyTorch on CPU."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BnmoveError(f"{path.name} fails onnx.checker: {str(exc).splitlines()[0]}") from exc
    with eval_mode(model):
        want = [t.detach().float().cpu().numpy() for t in output_tensors(run_model(model, example_inputs))]
    session = _ort_session(path)
    feeds = {
        i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), example_inputs, strict=True)
    }
    got = session.run(None, feeds)
    try:
        measured = difference(want, got)
    except BnmoveError as exc:
        raise BnmoveError(f"{path.name}: onnxruntime's outputs do not match PyTorch's ({exc})") from exc
    return measured.max_abs, measured.scale

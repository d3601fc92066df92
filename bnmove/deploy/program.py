"""The converted model as a torch.export program: loads with torch alone, dynamic where the model allows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.running import eval_mode
from ..errors import BnmoveError
from .onnx_file import quiet_export, root_cause

if TYPE_CHECKING:  # onnx costs 0.7 s to import: only the commands that export load it
    pass


def save_program(model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path) -> list[str]:
    """Save ``model`` (eval mode) as a ``torch.export`` program: it loads with torch alone, no code.

    ``torch.export.load(path).module()`` runs it. Every dimension of the first
    input stays dynamic where the model allows (batch; height and width for a
    model that pools to a fixed size, so one file serves several resolutions;
    ``Dim.AUTO`` lets torch.export keep static what the model fixes). Returns
    the names of the first input's dynamic dimensions.
    """
    inputs = [x.expand(2, *x.shape[1:]).clone() if x.dim() and x.shape[0] == 1 else x for x in example_inputs]
    auto = torch.export.Dim.AUTO  # torch.export specialises size-1 dimensions: a batch of 1 would stay 1
    with eval_mode(model), quiet_export():
        try:
            shapes = tuple({d: auto for d in range(x.dim())} for x in inputs)
            program = torch.export.export(model, tuple(inputs), dynamic_shapes=shapes)
        except Exception:  # a model that fixes its shapes in ways AUTO cannot follow: export it static
            try:
                program = torch.export.export(model, tuple(example_inputs))
            except Exception as exc:
                raise BnmoveError(f"torch.export failed: {root_cause(exc)}") from exc
    torch.export.save(program, str(path))
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    first = (
        placeholders.get(program.graph_signature.user_inputs[0])
        if program.graph_signature.user_inputs
        else None
    )
    value = first.meta.get("val") if first is not None else None
    if not isinstance(value, torch.Tensor):
        return []
    dynamic = [d for d, size in enumerate(value.shape) if not str(size).isdigit()]
    spatial = [d for d in dynamic if d >= 2]
    if spatial and not _runs_at_twice_the_size(program, inputs, spatial):
        dynamic = [d for d in dynamic if d < 2]  # symbolic but tied (a Linear after a flatten): not "any"
    return [_dim_name(d, value.dim()) for d in dynamic]


def _runs_at_twice_the_size(program: Any, inputs: Sequence[torch.Tensor], dims: list[int]) -> bool:
    """Whether the exported program runs with the first input's ``dims`` doubled (the guards torch.export
    keeps for a size the model ties to a layer would refuse it)."""
    first = inputs[0]
    shape = [n * 2 if d in dims else n for d, n in enumerate(first.shape)]
    try:
        with torch.no_grad(), quiet_export():
            program.module()(torch.randn(shape, dtype=first.dtype, device=first.device), *inputs[1:])
    except Exception:
        return False
    return True


def _dim_name(d: int, rank: int) -> str:
    """``batch``, ``height``, ``width``… for dimension ``d`` of an N x C x … input."""
    spatial = {3: ("length",), 4: ("height", "width"), 5: ("depth", "height", "width")}.get(rank, ())
    if d == 0:
        return "batch"
    if d >= 2 and d - 2 < len(spatial):
        return spatial[d - 2]
    return f"dim {d}"

"""An example input for a model, read from its first layer."""

from __future__ import annotations

import torch
from torch import fx, nn

from ..errors import BnmoveError
from .tracing import trace_graph

_INPUT_SIZE = {1: (224,), 2: (224, 224), 3: (16, 112, 112)}


def _first_layer(model: nn.Module, graph: fx.Graph | None) -> nn.Module | None:
    if graph is None:
        try:
            graph = trace_graph(model)
        except Exception:  # untraceable: fall back to registration order
            graph = None
    if graph is not None:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) == 1:
            for node in graph.nodes:
                if node.op == "call_module" and placeholders[0] in node.all_input_nodes:
                    return model.get_submodule(str(node.target))
                if node.op in ("call_function", "call_method"):
                    break
    for module in model.modules():
        if not any(True for _ in module.children()):
            return module
    return None


def infer_example_inputs(model: nn.Module, graph: fx.Graph | None = None) -> tuple[torch.Tensor, ...]:
    """One example input from the first layer: ``Conv2d(C, ...)`` -> ``1xCx224x224``, ``Linear(F, ...)`` -> ``1xF``.

    ``graph`` is the model's traced graph when the caller already has it (saves a trace).
    Raises [`BnmoveError`][bnmove.BnmoveError] asking for ``--input-shape`` when the first
    layer says nothing about its input.
    """
    layer = _first_layer(model, graph)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    shape: tuple[int, ...] | None = None
    if isinstance(
        layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    ):
        shape = (1, layer.in_channels, *_INPUT_SIZE[len(layer.kernel_size)])
    elif isinstance(layer, nn.Linear):
        shape = (1, layer.in_features)
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm) and not isinstance(
        layer.weight, nn.parameter.UninitializedParameter
    ):
        dims = {nn.BatchNorm1d: 0, nn.BatchNorm3d: 3}.get(type(layer), 2)  # type: ignore[call-overload]
        shape = (2, layer.num_features, *_INPUT_SIZE.get(dims, ())[:dims])
    if shape is None:
        first = type(layer).__name__ if layer is not None else "nothing"
        raise BnmoveError(
            f"cannot infer the input shape (the first layer is {first}); "
            "give it with --input-shape, e.g. --input-shape 1,3,224,224"
        )
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(shape, generator=generator).to(device=device, dtype=dtype),)

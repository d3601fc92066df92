"""Run models safely and measure how far a converted model's outputs moved."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from ..analysis.tracing import trace_graph, untouched
from ..errors import BnmoveError, ModelRunError

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
    Raises :class:`BnmoveError` asking for ``--input-shape`` when the first
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


def inputs_from_shapes(model: nn.Module, shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each module's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """``model(*inputs)`` without grad; the model's own exceptions become :class:`ModelRunError`."""
    try:
        with torch.inference_mode():  # cheaper than no_grad: outputs are only compared
            return model(*tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, list(inputs)))
    except Exception as exc:
        shapes = ", ".join(
            "x".join(map(str, x.shape)) for x in tree_flatten(list(inputs))[0] if isinstance(x, torch.Tensor)
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelRunError(
            f"the model's forward raised {type(exc).__name__} on input {shapes}: {first}"
        ) from exc


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in an output of any structure: tensors, tuples, lists, dicts (HF ``ModelOutput``
    included), dataclasses, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in output_tensors(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for f in dataclasses.fields(output) for t in output_tensors(getattr(output, f.name))]
    return []


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance (of the output's magnitude) that float rounding can explain."""
    return {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}.get(dtype, 1e-4)


#: absolute errors below ``tolerance * ABS_FLOOR`` (1e-6 in float32) are rounding whatever the outputs' size
ABS_FLOOR = 1e-2


@dataclass(frozen=True)
class Deviation:
    """How far converted outputs are from the original's on the same inputs (eval mode)."""

    max_abs_error: float
    max_rel_error: float
    input_shapes: list[list[int]]
    tolerance: float
    #: the same conversion made and compared on a float64 copy, when the float32 comparison
    #: exceeds its tolerance: it tells float rounding the network amplifies from a changed function
    float64_rel_error: float | None = None

    @property
    def within_tolerance(self) -> bool:
        if self.max_abs_error <= self.tolerance * ABS_FLOOR:
            return True  # outputs near zero: a relative error says nothing about rounding there
        if self.float64_rel_error is not None:
            return self.float64_rel_error <= tolerance_for(torch.float64)
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_tolerance": self.within_tolerance}


def output_error(want: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> tuple[float, float]:
    """The largest absolute difference between paired output tensors, and the largest |want|
    (the scale of a relative error). Empty tensors count as agreeing; a non-float tensor
    counts 1 where it differs at all."""
    max_abs = scale = 0.0
    for a, b in zip(want, got, strict=True):
        if not a.numel():
            continue
        if not a.is_floating_point():
            max_abs = max(max_abs, float((a != b).any()))
            continue
        max_abs = max(max_abs, float((a.double() - b.double()).abs().max()))
        scale = max(scale, float(a.double().abs().max()))
    return max_abs, scale


def compare_models(reference: nn.Module, converted: nn.Module, inputs: Sequence[Any]) -> Deviation:
    """Max abs error and error relative to the reference's largest |output|, in eval mode.

    Every tensor of any output structure (tuples, dicts, dataclasses) is
    compared. The reference runs without keeping anything its forward caches.
    """
    with eval_mode(reference), untouched(reference):
        want = output_tensors(run_model(reference, inputs))
    with eval_mode(converted):
        got = output_tensors(run_model(converted, inputs))
    if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got, strict=True)):
        raise BnmoveError("converted model returns outputs of a different structure (bnmove bug)")
    max_abs, scale = output_error(want, got)
    dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    deviation = Deviation(
        max_abs_error=max_abs,
        max_rel_error=max_abs / max(scale, 1e-12) if max_abs else 0.0,
        input_shapes=[list(x.shape) for x in tree_flatten(list(inputs))[0] if isinstance(x, torch.Tensor)],
        tolerance=tolerance_for(dtype),
    )
    return deviation


def double_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Floating-point tensors of ``inputs`` (any structure) in float64."""
    return tuple(
        tree_map(
            lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, list(inputs)
        )
    )

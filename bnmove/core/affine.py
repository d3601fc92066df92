"""The per-channel affine map an exact move keeps where no layer can absorb the BN's.

BN in eval mode is ``A(z) = a*z + b`` per channel plus, in train mode, a
normalisation. Moving BatchNorm across the activation moves the normalisation;
where no Conv/Linear beside the pair can take ``A`` (a BN fed by an add or a
concatenation, or before a padded conv), ``A`` stays on its side as this module
(learnable weight and bias, no statistics), and the new BN, the identity in
eval mode with the true statistics of its input, goes to the other side:

* before -> after: ``X -> BN -> f`` becomes ``X -> A -> f -> BN'``;
* after -> before: ``f -> BN -> N`` becomes ``BN' -> f -> A -> N``.

Eval outputs are unchanged for every activation. It exports to ONNX as Mul
and Add; a later move folds a BN into it exactly, like into a Linear.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import torch
from torch import fx, nn

from . import bn_math
from .clone import clone_module, graph_copy
from .graph_code import SharedCodeModule


def _graph() -> fx.Graph:
    """``x * weight.view(1, -1, 1, …) + bias.view(1, -1, 1, …)``, the view's rank read from ``x``."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    rest = graph.call_function(operator.sub, (graph.call_method("dim", (x,)), 2))
    shape = graph.call_function(operator.add, ([1, -1], graph.call_function(operator.mul, ([1], rest))))
    weight = graph.call_method("view", (graph.get_attr("weight"), shape))
    bias = graph.call_method("view", (graph.get_attr("bias"), shape))
    graph.output(graph.call_function(operator.add, (graph.call_function(operator.mul, (x, weight)), bias)))
    return graph


#: the code of every kept affine (regenerated the same after deepcopy and after loading)
_CODE = _graph().python_code(root_module="self").src


class _SharedGraphAffine(SharedCodeModule):
    """A kept affine whose graph is copied from the template's when it is first read, not when the
    layer is made: the copy is most of what making one costs (79 of 136 µs), and a conversion makes
    one for every pair that keeps an affine (149 in a 150-block CNN's round trip), whose graph no one
    reads. Pickling and deep-copying read it first (torch's versions of them copy the instance's
    dictionary before they read the graph), so they write what a plain GraphModule writes; an edit
    of one layer's graph is that layer's alone."""

    #: the template's graph, of which every kept affine's is a copy
    _shared_graph: fx.Graph | None = None

    def __getattr__(self, name: str) -> Any:
        shared = type(self)._shared_graph
        if name == "_graph" and shared is not None:
            graph = graph_copy(shared)
            graph.owning_module = self
            self.__dict__["_graph"] = graph
            return graph
        return super().__getattr__(name)

    def __reduce__(self) -> Any:
        _ = self.graph  # copied from the template first: torch's reduce copies the dictionary
        return super().__reduce__()

    def __reduce_package__(self, exporter: Any) -> Any:
        _ = self.graph
        return super().__reduce_package__(exporter)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        _ = self.graph
        return super().__deepcopy__(memo)


@functools.cache
def _template() -> fx.GraphModule:
    """The kept affine every new one is copied from (no channels; never handed out): a copy reuses
    its compiled code, and its graph is copied only when read (`_SharedGraphAffine`)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.ones(0))
    holder.bias = nn.Parameter(torch.zeros(0))
    template = _SharedGraphAffine(holder, _graph(), class_name="ChannelAffine")
    _SharedGraphAffine._shared_graph = template.__dict__["_graph"]
    return template


class _Recognised(type):
    """``isinstance(m, ChannelAffine)`` holds for the torch-only layer [`ChannelAffine`][bnmove.core.affine.ChannelAffine] builds
    and for the layer of bnmove 0.1 that files saved then still hold."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return type.__instancecheck__(cls, obj) or (
            isinstance(obj, fx.GraphModule)
            and obj.code == _CODE
            and set(dict(obj.named_parameters())) == {"weight", "bias"}
        )


class ChannelAffine(nn.Module, metaclass=_Recognised):
    """``y = weight[c] * x + bias[c]`` over channel dimension 1, for inputs of any rank >= 2.

    ``ChannelAffine(C)`` returns a `torch.fx.GraphModule` (learnable ``weight`` and
    ``bias`` of shape ``(C,)``, printed as ``ChannelAffine`` until deep-copied): torch alone
    saves, loads, scripts and exports it, so a converted model never needs bnmove to load.
    ``isinstance(m, ChannelAffine)`` recognises it by its code. Instances of this class itself
    exist only where a file saved by bnmove 0.1 is loaded; they compute the same.
    """

    def __new__(
        cls,
        num_features: int | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Any:
        if num_features is None:  # unpickling a layer saved by bnmove 0.1
            return super().__new__(cls)
        affine = clone_module(_template())
        affine.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        affine.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        return affine

    weight: nn.Parameter
    bias: nn.Parameter

    def __init__(
        self,
        num_features: int | None = None,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:  # never reached: __new__ returns a GraphModule, and unpickling sets the state
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


def affine_map(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` in float64 of the eval-mode map ``a*z + b`` of a BatchNorm (or of a kept ChannelAffine)."""
    if isinstance(bn, ChannelAffine):
        return bn.weight.detach().double(), bn.bias.detach().double()
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    assert mean is not None and var is not None, "an eval-mode map needs running statistics"
    a, b, _ = bn_math.bn_affine(mean, var, bn.weight, bn.bias, float(bn.eps))  # type: ignore[arg-type]
    return a, b


def scale_positive(bn: nn.Module) -> bool:
    """Every channel's eval-mode scale ``a`` is positive (a maximum then passes the map)."""
    a, _ = affine_map(bn)
    return bool((a > 0).all())


#: ulps of the BN's own dtype within which its map counts as the identity
IDENTITY_ULPS = 4


def is_identity(bn: nn.Module) -> bool:
    """The eval-mode map is the identity to within the rounding of the dtype it is stored in.

    An exact move leaves such a BN (BN′, weight ``√(var+ε)`` and bias ``mean``: it normalises in
    training and passes its input through in eval). Stored in float32 its map is
    ``a = 1 ± 1 ulp``, ``b = mean·(1 − a)``; evaluating it rounds its input as much. Per channel:
    ``|a − 1| ≤ 4u`` and ``|b| ≤ 4u·(|mean| + √(var+ε))``, the size of what it reads, with ``u`` the
    dtype's machine epsilon (a kept affine: ``|b| ≤ 4u``)."""
    stored = bn.weight if isinstance(getattr(bn, "weight", None), torch.Tensor) else bn.running_mean
    assert isinstance(stored, torch.Tensor)
    u = IDENTITY_ULPS * torch.finfo(stored.dtype).eps
    if _first_channel_far(bn, u):
        return False
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if isinstance(bn, ChannelAffine) or mean is None or var is None:
        a, b = affine_map(bn)
        size: torch.Tensor | float = 1.0
    else:  # `affine_map`'s numbers, its √(var+ε) read once for the size too
        eps: float = bn.eps  # type: ignore[assignment]
        a, b, scale = bn_math.bn_affine(mean, var, bn.weight, bn.bias, eps)  # type: ignore[arg-type]
        size = mean.detach().double().abs() + scale
    return bool(((a - 1).abs() <= u).all() and (b.abs() <= u * size).all())


def _first_channel_far(bn: nn.Module, u: float) -> bool:
    """The first channel's map, in Python floats, at least twice outside `is_identity`'s bounds: a BN
    that computes something fails here, before the per-channel test's dozen tensor operations
    (a conversion asks it of every BN it moves)."""
    first = [
        float(t.detach().reshape(-1)[0]) if isinstance(t, torch.Tensor) and t.numel() else None
        for t in (getattr(bn, n, None) for n in ("weight", "bias", "running_mean", "running_var"))
    ]
    weight, bias, mean, var = first
    if isinstance(bn, ChannelAffine) or mean is None or var is None:
        a, b, size = weight if weight is not None else 1.0, bias or 0.0, 1.0
    else:
        eps: float = bn.eps  # type: ignore[assignment]
        scale = math.sqrt(var + eps)
        a = (weight if weight is not None else 1.0) / scale
        b, size = (bias or 0.0) - a * mean, abs(mean) + scale
    return abs(a - 1.0) > 2 * u or abs(b) > 2 * u * size


__all__ = ["ChannelAffine", "affine_map", "is_identity", "scale_positive"]

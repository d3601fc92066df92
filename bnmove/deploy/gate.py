"""The gate fold: a BN that feeds a squeeze-and-excitation gate and the product the gate scales.

In an after-placement inverted-residual block (MobileNetV3, EfficientNet) the BN's output
``x = a·u + b`` feeds a gate ``s = σ(W₂ δ(W₁ pool(x)))`` and the product ``x·s``, which a
projection ``N`` reads. Both uses take the map exactly:

    pool(a·u + b) = a·pool(u) + b          the gate's first layer absorbs the map (a forward fold)
    N((a·u + b)·s) = N_a(u·s) + W̄·(b ⊙ s)  N takes the scale; the shift becomes a per-sample bias

with ``N_a`` the layer with ``W·a`` per input channel and ``W̄`` its kernel summed over taps: the
pooling is global, so ``b ⊙ s`` is constant over space and an unpadded conv sees the same field at
every position. `GateBias` computes ``W̄·(b ⊙ s)``, a ``C_out × C_in`` matrix applied to the
gate vector (about ``C_out·C_in`` multiply-adds per sample, against the BN's pass over the whole
expanded tensor), and the projection's output takes it with one broadcast ``Add``.

The product and the projection are usually called in different forwards (the gate module's and
its parent's), so the fold rewrites the fx graph of the region that holds both and puts it in the
region's place as a ``torch.fx.GraphModule``: the folded model is for export and inference, like
every model [`fold_forward`][bnmove.deploy.fold_forward] returns. Where the projection feeds its own BN
(a before-placement BN that the exporter fuses into it), the bias is added after that BN, scaled by
its map, so the fusion still happens.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..analysis.batchnorms import has_eval_map
from ..analysis.folds import NoFold, consumers, use_refusal
from ..analysis.layers import AFFINE_LAYERS, forward_fold_blocker
from ..analysis.nodes import describe_node, skip_identity_down, skip_identity_up
from ..core.affine import ChannelAffine, affine_map
from ..rules.table import fold_map

_PRODUCTS = {operator.mul, torch.mul, "mul"}


class GateBias(nn.Module):
    """``W̄·(b ⊙ s)`` per sample: the BN's shift through the projection, scaled by the gate vector ``s``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight: torch.Tensor
        self.register_buffer("weight", weight.detach().clone())

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        bias = F.linear(scale.flatten(1), self.weight.to(scale.dtype))
        return bias.reshape(scale.shape[0], -1, *scale.shape[2:])


@dataclass(frozen=True)
class GateFold:
    """Where a gate fold goes: the gate's first layer, the product, the gate vector, the projection."""

    gate: fx.Node
    product: fx.Node
    scale: fx.Node
    into: fx.Node
    #: a BN right after the projection (a before-placement BN the runtime fuses into it): the bias is
    #: added after it, scaled by its map, so nothing stands between the projection and its BN
    then: fx.Node | None = None


def _ones(size: object) -> bool:
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Pooling that leaves one value per sample and channel."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return _ones(module.output_size)
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.startswith("adaptive_avg_pool"):
        return _ones(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size"))
    if name == "mean":
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        return bool(keep) and isinstance(dims, (tuple, list)) and sorted(dims) in ([2], [2, 3], [2, 3, 4])
    return False


def _fold_blocker(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], channels: int, label: str
) -> str | None:
    """Why ``node`` cannot take the BN's map forward, or None."""
    layer = modules.get(str(node.target)) if node.op == "call_module" else None
    if not isinstance(layer, AFFINE_LAYERS) or isinstance(layer, ChannelAffine):
        return f"{label} is {describe_node(node, modules)}, not a Conv/Linear to fold into"
    refused = use_refusal(node, layer, calls, channels, label)
    if refused is not None:
        return refused
    blocked = forward_fold_blocker(layer)
    if blocked is None and int(getattr(layer, "groups", 1)) != 1:
        blocked = "it is a grouped conv"
    return None if blocked is None else f"cannot fold into {label}: {blocked}"


def _scale_comes_from_gate(scale: fx.Node, gate: fx.Node, end: fx.Node) -> bool:
    """Every way back from the gate vector meets the gate's first layer before the BN's output or
    an input: ``s`` is a function of the pooled BN output alone."""
    seen: set[fx.Node] = set()
    stack, met = [scale], False
    while stack:
        node = stack.pop()
        if node is gate:
            met = True
            continue
        if node in seen:
            continue
        seen.add(node)
        if node is end or node.op == "placeholder":
            return False
        stack.extend(node.all_input_nodes)
    return met


def gate_fold(
    node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    channels: int,
    positive: bool,
    label: Callable[[fx.Node], str] = lambda n: str(n.target),
) -> GateFold | NoFold | None:
    """The gate fold of the BN (or kept affine) at ``node``: its output feeds a global pooling into one
    layer (the gate) and a product with the gate's vector, which one unpadded conv or Linear reads.
    None where the BN feeds no gated product at all; `NoFold` with the reason where the
    pattern is there but the fold would not be exact."""
    found, _, blocked = consumers(node, modules, positive)
    end = skip_identity_down(node, modules)
    products = [n for n in found if n.target in _PRODUCTS and n in end.users]
    layers = [n for n in found if n not in products]
    if blocked or len(products) != 1 or len(layers) != 1 or len(found) != 2:
        return None
    (product,), (gate,) = products, layers
    if product.kwargs or len(product.args) != 2 or sum(a is end for a in product.args) != 1:
        return None
    scale = next(a for a in product.args if a is not end)
    if not isinstance(scale, fx.Node) or not _scale_comes_from_gate(scale, gate, end):
        return NoFold("the BN's output is multiplied by something other than a gate computed from it")
    pooled = (
        skip_identity_up(gate.args[0], modules) if gate.args and isinstance(gate.args[0], fx.Node) else None
    )
    if pooled is None or not _global_pool(pooled, modules):
        return NoFold("the gate's pooling is not global, so its vector is not constant over space")
    readers = list(skip_identity_down(product, modules).users)
    if len(readers) != 1:
        return NoFold(f"the gated product feeds {len(readers)} nodes, not one layer")
    for layer, role in ((gate, "the gate's first layer"), (readers[0], "the gated product's layer")):
        why = _fold_blocker(layer, modules, calls, channels, f"{role} {label(layer)}")
        if why is not None:
            return NoFold(why)
    into = readers[0]
    after = list(skip_identity_down(into, modules).users)
    then = after[0] if len(after) == 1 and _plain_bn(after[0], modules, calls) else None
    return GateFold(gate, product, scale, into, then)


def _plain_bn(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> bool:
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    return module is not None and has_eval_map(module) and calls.get(str(node.target), 0) == 1


def apply_gate_fold(
    root: nn.Module, graph: fx.Graph, fold: GateFold, a: torch.Tensor, b: torch.Tensor
) -> str:
    """Fold ``a·u + b`` into the gate and the projection and add the per-sample bias; returns the
    name of the `GateBias` module. The BN's slot is the caller's to empty."""
    original = cast(torch.Tensor, root.get_submodule(str(fold.into.target)).weight)
    weight = original.detach().double()
    summed = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1) if weight.dim() > 2 else weight
    bias_weight = (summed * b.to(weight.device).double()[None, :]).to(original.dtype)
    anchor = fold.into
    if fold.then is not None:  # BN₂(N(x) + g) = BN₂(N(x)) + a₂·g
        anchor = fold.then
        scale, _ = affine_map(root.get_submodule(str(fold.then.target)))
        bias_weight = (bias_weight.double() * scale.to(bias_weight.device)[:, None]).to(original.dtype)
    fold_map(root, a, b, str(fold.gate.target), "forward")
    fold_map(root, a, torch.zeros_like(b), str(fold.into.target), "forward")
    name, index = "bnmove_gate_bias", 0
    while hasattr(root, f"{name}_{index}"):
        index += 1
    name = f"{name}_{index}"
    root.add_module(name, GateBias(bias_weight))
    with graph.inserting_after(anchor):
        bias = graph.call_module(name, (fold.scale,))
    with graph.inserting_after(bias):
        total = graph.call_function(operator.add, (anchor, bias))
    anchor.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    return name


__all__ = ["GateBias", "GateFold", "apply_gate_fold", "gate_fold"]

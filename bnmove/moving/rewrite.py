"""What one move does to parameters, and the node reordering of a graph move.

Parameters (``adjust``): the exact method folds the old BN into the
Conv/Linear beside it and turns the BN module itself into BN', the identity in
eval mode but holding real statistics (see ``bn_math``); ``fit`` gives BN' the
least-squares parameters that reproduce the block; ``swap`` changes nothing.
The BN module object is kept, so its hooks, class and keys stay.

Structure: where BN and activation are modules, :mod:`bnmove.moving.surgery` moves
the modules; elsewhere ``move_after(bn, act)`` turns ``X -> BN -> f -> users``
into ``X -> f -> BN -> users`` in a graph and ``move_before(bn, act)`` the
reverse (Identity calls in between stay put).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx, nn

from ..analysis.detect import Site
from ..analysis.fused import FusedNorm, make_plain_batchnorm
from ..analysis.layers import AFFINE_LAYERS
from ..analysis.patterns import (
    activation_spec,
    bn_channels,
    input_is_shared,
    is_batchnorm_module,
    make_out_of_place,
    match_activation,
    out_of_place_function,
)
from ..core import bn_math
from ..core.affine import ChannelAffine, affine_map

log = logging.getLogger(__name__)


def move_after(node: fx.Node, anchor: fx.Node) -> None:
    """``X -> node -> ... -> anchor -> users`` becomes ``X -> ... -> anchor -> node -> users``.

    The nodes between (Identity calls) stay where they are; ``node`` takes
    its input as first argument and every link on the way has one user.
    """
    source = node.args[0]
    assert isinstance(source, fx.Node)
    downstream = list(anchor.users)  # before node becomes one of them
    node.replace_all_uses_with(source)
    node.replace_input_with(source, anchor)
    for user in downstream:
        user.replace_input_with(anchor, node)
    anchor.append(node)


def move_before(node: fx.Node, anchor: fx.Node) -> None:
    """``X -> anchor -> ... -> node -> users`` becomes ``X -> node -> anchor -> ... -> users``."""
    source, upstream = node.args[0], anchor.args[0]
    assert isinstance(source, fx.Node) and isinstance(upstream, fx.Node)
    chain = [source]
    while chain[-1] is not anchor:
        parent = chain[-1].args[0]
        assert isinstance(parent, fx.Node)
        chain.append(parent)
    node.replace_all_uses_with(source)
    node.replace_input_with(source, upstream)
    anchor.replace_input_with(upstream, node)
    # Move the activation (and links) down rather than the BN up: the BN's other
    # arguments (a functional BN's statistics) may be defined just before it.
    previous = node
    for link in reversed(chain):
        previous.append(link)
        previous = link


def split_fused(module: nn.Module, fused: FusedNorm) -> tuple[nn.Module, nn.Module] | None:
    """A fused norm+act module as ``(plain BN, activation module)``, or None when no module computes its act.

    The plain BN holds the fused module's state (its own keys) without its
    children; the activation is the fused module's own child, or a torch module
    made from the function the fused forward calls (checked numerically).
    """
    plain = make_plain_batchnorm(module, fused.base)
    for name in list(plain._modules):
        del plain._modules[name]
    if fused.act_child is not None:
        return plain, module.get_submodule(fused.act_child)
    act = activation_module(fused.call.spec.kind, fused.act_target, fused.act_args, fused.act_kwargs)
    return None if act is None else (plain, act)


def activation_module(
    kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> nn.Module | None:
    """The torch module that computes ``target(x, *args, **kwargs)``, or None (checked on a probe)."""
    spec = activation_spec(kind)
    if not spec.modules:
        return None
    options = {k: v for k, v in kwargs.items() if k != "inplace"}
    try:
        module = spec.modules[0](*args, **options)
    except TypeError:
        return None
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        if isinstance(target, str):
            want = getattr(probe.clone(), target.rstrip("_"))(*args, **options)
        else:
            want = out_of_place_function(target)(probe.clone(), *args, **options)
        return module if torch.allclose(module(probe.clone()), want, atol=1e-6) else None


def _constant(root: nn.Module, value: Any) -> Any:
    if isinstance(value, fx.Node):
        if value.op != "get_attr":
            raise _NotConstant
        tensor: Any = root
        for part in str(value.target).split("."):
            tensor = getattr(tensor, part)
        return tensor.detach().double().cpu() if isinstance(tensor, torch.Tensor) else tensor
    return value


class _NotConstant(Exception):
    pass


def pair_activation(root: nn.Module, site: Site) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The pair's activation as a float64 function of its input (None if it needs runtime tensors)."""
    fused = site.fused
    if fused is not None:
        if fused.act_child is not None:
            return module_function(root.get_submodule(f"{site.bn_node.target}.{fused.act_child}"))
        act_args, act_kwargs = fused.act_args, {k: v for k, v in fused.act_kwargs.items() if k != "inplace"}
        if isinstance(fused.act_target, str):
            method = fused.act_target.rstrip("_")
            return lambda z: getattr(z, method)(*act_args, **act_kwargs)  # type: ignore[no-any-return]
        target = out_of_place_function(fused.act_target)
        return lambda z: target(z, *act_args, **act_kwargs)  # type: ignore[no-any-return]
    assert site.act_node is not None
    return activation_function(root, site.act_node)


def module_function(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation module as a function that never writes over its input."""
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        # Stateless: call it as is, on a copy of the input in case it works in place.
        return lambda z: module(z.clone())  # type: ignore[no-any-return]
    # float64 on the CPU: quadrature needs the precision, not the accelerator.
    module = copy.deepcopy(module).double().cpu()
    if hasattr(module, "inplace"):
        module.inplace = False  # type: ignore[assignment]
    return cast("Callable[[torch.Tensor], torch.Tensor]", module)


def activation_function(root: nn.Module, node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation at ``node`` as a float64 function of its input (None if it needs runtime tensors)."""
    if node.op == "call_module":
        return module_function(root.get_submodule(str(node.target)))
    try:
        args = tuple(_constant(root, a) for a in node.args[1:])
        kwargs = {k: _constant(root, v) for k, v in node.kwargs.items() if k != "inplace"}
    except _NotConstant:
        return None
    if node.op == "call_method":
        method = str(node.target).rstrip("_")
        return lambda z: getattr(z, method)(*args, **kwargs)  # type: ignore[no-any-return]
    target = out_of_place_function(node.target)
    assert callable(target)
    return lambda z: target(z, *args, **kwargs)  # type: ignore[no-any-return]


_BatchNorm = nn.modules.batchnorm._BatchNorm


def set_bn(
    bn: _BatchNorm, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> None:
    """Give ``bn`` (already folded or fitted away) new parameters and fresh running statistics.

    Done in place on the working copy: eps, momentum, class, hooks, train flag
    and state-dict keys stay; ``num_batches_tracked`` restarts at 0. An
    ``affine=False`` BN gains weight and bias.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    ref = bn.running_mean
    if not getattr(bn, "affine", True):
        bn.weight = nn.Parameter(torch.empty_like(ref))
        bn.bias = nn.Parameter(torch.empty_like(ref))
        bn.affine = True
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        tracked = getattr(bn, "num_batches_tracked", None)
        if tracked is not None:
            tracked.zero_()


def make_identity(bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """BN': the identity in eval mode, holding the real statistics ``(mean, var)`` of its input."""
    set_bn(bn, *bn_math.identity_bn_params(mean, var, float(bn.eps)), mean, var)


def batchnorm_at(root: nn.Module, name: str) -> _BatchNorm:
    """The BN at ``name``; a frozen BN has the same state under the same names, so it is typed as one."""
    module = root.get_submodule(name)
    assert is_batchnorm_module(module)
    return cast("_BatchNorm", module)


def _affine_layer(root: nn.Module, name: str) -> nn.Conv1d | nn.Linear:
    """The Conv/ConvTranspose/Linear at ``name`` (typed as one with ``weight`` and ``bias``)."""
    module = root.get_submodule(name)
    assert isinstance(module, AFFINE_LAYERS)
    return cast("nn.Conv1d | nn.Linear", module)


def gamma_beta(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    n = bn_channels(bn)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    return gamma.cpu(), beta.cpu()


def _set_weight_bias(layer: nn.Conv1d | nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    w = layer.weight
    with torch.no_grad():
        w.copy_(weight.to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype))
        else:
            layer.bias.copy_(bias.to(layer.bias.dtype))


def fold_bn(
    root: nn.Module, bn_name: str, layer_name: str, fold: Callable[..., tuple[torch.Tensor, torch.Tensor]]
) -> Any:
    """Fold BN ``bn_name`` into layer ``layer_name`` with ``fold`` (``bn_math.fold_into_*``); returns the BN.

    ``bn_name`` may also name a kept ChannelAffine (deployment folds those forward too).
    """
    source = root.get_submodule(bn_name)
    bn = source if isinstance(source, ChannelAffine) else batchnorm_at(root, bn_name)
    fold_map(root, *affine_map(bn), layer_name, fold)
    return bn


def fold_map(
    root: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    layer_name: str,
    fold: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Fold the per-channel map ``a*z + b`` into layer ``layer_name`` with ``fold`` (``bn_math.fold_into_*``)."""
    layer = _affine_layer(root, layer_name)
    if isinstance(layer, ChannelAffine):  # diagonal: A then BN, or BN then A, is again one affine
        w, c = layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()
        if fold is bn_math.fold_into_preceding:
            _set_weight_bias(layer, a * w, a * c + b)  # type: ignore[arg-type]
        else:
            _set_weight_bias(layer, w * a, w * b + c)  # type: ignore[arg-type]
        return
    transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    device = layer.weight.device
    weight, bias = fold(
        layer.weight,
        layer.bias,
        a.to(device),
        b.to(device),
        transposed=transposed,
        groups=int(getattr(layer, "groups", 1)),
    )
    _set_weight_bias(layer, weight, bias)


def kept_affine(bn: _BatchNorm) -> ChannelAffine:
    """The BN's eval-mode map ``a*z + b`` as a layer of its own (same device and dtype)."""
    a, b = affine_map(bn)
    ref = bn.running_mean
    assert ref is not None
    affine = ChannelAffine(bn_channels(bn), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        affine.weight.copy_(a)
        affine.bias.copy_(b)
    affine.train(bn.training)
    return affine


def move_nodes(site_placement: str, bn: fx.Node, act: fx.Node) -> None:
    """Reorder one pair's nodes in a graph: BN to the other side of the activation."""
    if site_placement == "before":
        move_after(bn, act)
    else:
        move_before(bn, act)


def insert_affine(site_placement: str, act: fx.Node, target: str) -> fx.Node:
    """After a graph move, call the kept affine ``target`` on its side of the activation.

    Before -> after: ``X -> A -> f -> BN'``; after -> before: ``BN' -> f -> A -> N``.
    """
    graph = act.graph
    if site_placement == "before":
        source = act.args[0]
        assert isinstance(source, fx.Node)
        with graph.inserting_before(act):
            node = graph.call_module(target, (source,))
        act.replace_input_with(source, node)
    else:
        with graph.inserting_after(act):
            node = graph.call_module(target, (act,))
        act.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def guard_inplace(act: fx.Node, modules: dict[str, nn.Module]) -> list[str]:
    """After a move, an in-place activation must not overwrite a tensor others still read."""
    if input_is_shared(act, modules):
        call = match_activation(act, modules)
        if call is not None and call.inplace:
            make_out_of_place(act, modules)
            return ["activation made out-of-place: its new input has other readers"]
    return []


__all__ = [
    "activation_function",
    "activation_module",
    "fold_bn",
    "guard_inplace",
    "insert_affine",
    "kept_affine",
    "make_identity",
    "move_after",
    "move_before",
    "move_nodes",
    "pair_activation",
    "set_bn",
    "split_fused",
]

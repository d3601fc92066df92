"""The parameter side every rule shares: a pair's activation as a function, reading and writing BNs.

Everything here works in place on the working copy and keeps each module object
(class, hooks, state-dict keys); only values change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Sequence
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..analysis.batchnorms import bn_channels, is_batchnorm_module
from ..analysis.detect import Site
from ..analysis.patterns import activation_call
from ..core import bn_math, piecewise
from ..core.modules import settings, submodule


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
            return module_function(submodule(root, f"{site.bn_node.target}.{fused.act_child}"))
        return activation_call(fused.act_target, fused.act_args, fused.act_kwargs)
    assert site.act_node is not None
    return activation_function(root, site.act_node)


def pair_activation_key(root: nn.Module, site: Site) -> Hashable | None:
    """Equal for two pairs whose activations are the same elementwise function (stateless modules
    of one class and settings, or one function or method with the same constant arguments), so
    their statistics can be solved together; None where that is not known."""
    fused = site.fused
    if fused is not None:
        if fused.act_child is not None:
            return _module_key(submodule(root, f"{site.bn_node.target}.{fused.act_child}"))
        return _call_key(fused.act_target, fused.act_args, fused.act_kwargs)
    node = site.act_node
    assert node is not None
    if node.op == "call_module":
        return _module_key(submodule(root, str(node.target)))
    if any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
        return None
    return _call_key(
        str(node.target).rstrip("_") if node.op == "call_method" else node.target, node.args[1:], node.kwargs
    )


def _module_key(module: nn.Module) -> Hashable | None:
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None  # per-channel or learnable (PReLU): its own function
    if next(module.children(), None) is not None:
        return None
    own = settings(module, skip=frozenset({"inplace"}))
    return None if own is None else _call_key(type(module), (), dict(own))


def _call_key(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Hashable | None:
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k != "inplace"))
    if not all(isinstance(v, (bool, int, float, str, type(None))) for v in (*args, *(v for _, v in options))):
        return None
    return (target, tuple(args), options)


#: the keys of ReLU, whose Gaussian moments have a closed form (`bnmove.core.rectified`)
RELU_KEYS = frozenset(
    (target, (), ()) for target in (nn.ReLU, torch.relu, torch.relu_, F.relu, F.relu_, "relu")
)

_PIECEWISE: dict[Any, Callable[[dict[str, Any], tuple[Any, ...]], list[piecewise.Piece]]] = {
    **dict.fromkeys((nn.ReLU6, F.relu6, "relu6"), lambda o, a: piecewise.clipped(0.0, 6.0)),
    **dict.fromkeys(
        (nn.Hardtanh, F.hardtanh, "hardtanh"),
        lambda o, a: piecewise.clipped(
            float(o.get("min_val", a[0] if a else -1.0)), float(o.get("max_val", a[1] if len(a) > 1 else 1.0))
        ),
    ),
    **dict.fromkeys(
        (nn.LeakyReLU, F.leaky_relu, "leaky_relu"),
        lambda o, a: piecewise.leaky(float(o.get("negative_slope", a[0] if a else 0.01))),
    ),
    **dict.fromkeys((nn.Hardswish, F.hardswish, "hardswish"), lambda o, a: piecewise.HARDSWISH),
    **dict.fromkeys((nn.Hardsigmoid, F.hardsigmoid, "hardsigmoid"), lambda o, a: piecewise.HARDSIGMOID),
}


def pieces_of(key: Hashable | None) -> list[piecewise.Piece] | None:
    """The pieces of a piecewise-polynomial activation (`bnmove.core.piecewise`) by its key, or None."""
    if not isinstance(key, tuple):
        return None
    target, args, options = key
    make = _PIECEWISE.get(target)
    return None if make is None else make(dict(options), args)


def module_function(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation module as a function that never writes over its input."""
    if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
        if getattr(module, "inplace", None) is True and type(module).__module__.startswith("torch.nn."):
            # torch's own: a shallow copy with inplace=False, sparing a copy of every input
            module = copy.copy(module)
            module.inplace = False  # type: ignore[assignment]
            return cast("Callable[[torch.Tensor], torch.Tensor]", module)
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
        return module_function(submodule(root, str(node.target)))
    try:
        args = tuple(_constant(root, a) for a in node.args[1:])
        kwargs = {k: _constant(root, v) for k, v in node.kwargs.items() if k != "inplace"}
    except _NotConstant:
        return None
    return activation_call(str(node.target) if node.op == "call_method" else node.target, args, kwargs)


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
    module = submodule(root, name)
    assert is_batchnorm_module(module)
    return cast("_BatchNorm", module)


def gamma_beta(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    n = bn_channels(bn)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    return gamma.cpu(), beta.cpu()

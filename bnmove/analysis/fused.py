"""Fused norm+activation modules (timm's ``BatchNormAct2d``): what their forward really computes,
checked numerically, and how to split them into a plain BatchNorm and an activation."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..core.blocked import Blocked
from ..core.forwards import OwnForwardTracer
from .batchnorms import is_functional_batchnorm
from .nodes import is_identity_node
from .patterns import ActivationCall, activation_call, match_activation


@dataclass(frozen=True)
class FusedNorm:
    """What a BatchNorm subclass with its own ``forward`` really computes."""

    base: type[nn.modules.batchnorm._BatchNorm]
    #: child module name of the activation, or None when it is a function call
    act_child: str | None
    act_target: Any
    act_args: tuple[Any, ...]
    act_kwargs: dict[str, Any]
    call: ActivationCall


def torch_batchnorm_base(module: nn.Module) -> type[nn.modules.batchnorm._BatchNorm]:
    """The torch BatchNorm class a (possibly user-defined) BN derives from."""
    for cls in type(module).__mro__:
        if cls.__module__ == "torch.nn.modules.batchnorm" and not cls.__name__.startswith("_"):
            if cls.__name__.startswith("Lazy"):
                continue
            return cls
    return nn.BatchNorm2d


def _probe_shape(base: type[nn.Module], channels: int) -> tuple[int, ...]:
    if base is nn.BatchNorm1d:
        return (3, channels)
    if base is nn.BatchNorm3d:
        return (3, channels, 2, 2, 2)
    return (3, channels, 3, 3)


#: a BatchNorm subclass whose forward is batch_norm alone (a fused module with its activation off)
def analyze_fused_norm(module: nn.Module) -> FusedNorm | Blocked | None:
    """Recognise ``batch_norm -> [identity/dropout] -> activation`` inside a BN subclass.

    Returns the recipe for splitting it, None when the forward is the batch norm
    alone (timm's ``BatchNormAct2d(apply_act=False)``), or why not when it is
    something else. The split is checked numerically.
    """
    probe = copy.deepcopy(module).eval()
    try:
        graph = OwnForwardTracer().trace(probe)
    except Exception as exc:
        return Blocked(f"forward of {type(module).__name__} could not be traced ({type(exc).__name__})")
    modules = dict(probe.named_modules())
    bn_calls = [n for n in graph.nodes if is_functional_batchnorm(n)]
    if len(bn_calls) != 1:
        return Blocked(f"forward of {type(module).__name__} is not one batch_norm call plus an activation")
    node = bn_calls[0]
    act: fx.Node | None = None
    call = None
    while len(node.users) == 1:
        (nxt,) = node.users
        if nxt.op == "output":
            return None  # its activation is disabled (an Identity): a plain BatchNorm
        call = match_activation(nxt, modules)
        if call is not None:
            act = nxt
            break
        if not is_identity_node(nxt, modules):
            break
        node = nxt
    if act is None or call is None or any(u.op != "output" for u in act.users):
        return Blocked(f"forward of {type(module).__name__} is not batch_norm followed by an activation")
    if any(isinstance(a, fx.Node) for a in (*act.args[1:], *act.kwargs.values())):
        return Blocked(f"activation in {type(module).__name__} takes tensor arguments")
    fused = FusedNorm(
        base=torch_batchnorm_base(module),
        act_child=str(act.target) if act.op == "call_module" else None,
        act_target=act.target,
        act_args=tuple(act.args[1:]),
        act_kwargs=dict(act.kwargs),
        call=call,
    )
    # Trust, but verify: the split must compute what the module computes. Checked in float64,
    # whatever the module's dtype (a float16 or float64 model converts too), on its device.
    probe = probe.to(torch.float64)
    plain = make_plain_batchnorm(probe, fused.base)
    ref = next(iter(probe.buffers()), None)
    x = torch.randn(
        _probe_shape(fused.base, int(probe.num_features)),  # type: ignore[arg-type]
        dtype=torch.float64,
        device=ref.device if ref is not None else None,
    )
    with torch.no_grad():
        want = probe(x.clone())
        got = apply_fused_activation(probe, fused, plain(x.clone()))
    if not torch.allclose(want, got, atol=1e-5, rtol=1e-4):
        return Blocked(f"{type(module).__name__} does not compute activation(batch_norm(x))")
    return fused


def make_plain_batchnorm(module: nn.Module, base: type[nn.Module]) -> nn.Module:
    """A plain torch BN holding ``module``'s state (children kept, so keys stay)."""
    bn = module
    ref = next(iter(module.buffers()), None)
    if ref is None:
        ref = next(iter(module.parameters()), None)
    plain = base(
        bn.num_features,  # type: ignore[arg-type]
        eps=bn.eps,  # type: ignore[arg-type]
        momentum=bn.momentum,  # type: ignore[arg-type]
        affine=bn.affine,  # type: ignore[arg-type]
        track_running_stats=bn.track_running_stats,  # type: ignore[arg-type]
        device=ref.device if ref is not None else None,
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else None,
    )
    for name, child in module.named_children():
        plain.add_module(name, child)
    missing = plain.load_state_dict(module.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    plain.train(module.training)
    return plain


def apply_fused_activation(module: nn.Module, fused: FusedNorm, x: torch.Tensor) -> torch.Tensor:
    if fused.act_child is not None:
        out: torch.Tensor = module.get_submodule(fused.act_child)(x)
        return out
    return activation_call(fused.act_target, fused.act_args, fused.act_kwargs)(x)

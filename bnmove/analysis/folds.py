"""The fold rules, side by side: may a BN's eval-mode map fold into the layer before it
(`backward_fold`: ``BN(L(x)) = L′(x)`` for the Conv/Linear that feeds it alone), or into the
layers after it (`forward_fold`)?

``N(a·u + b) = N'(u)`` for a Linear, an unpadded Conv or a pointwise
ConvTranspose ``N`` (``bn_math.fold_into_following``), and for each layer of
several the BN feeds alike. The map passes on its way what commutes with a
per-channel affine map: links, average pooling without counted padding,
adaptive average pooling, flatten, a spatial mean, and max pooling where every
scale is positive. Into a zero-padded conv the fold is exact only with a
border correction (``bn_math``; ``deploy/border.py``), which deployment may
ask for.

``convert``'s exact moves (``L -> BN -> f`` to ``L' -> f -> BN'``; ``f -> BN -> N`` to
``BN' -> f -> N'``) and ``export``'s fuse-backward and ``--fold-forward/--fold-padded`` ask
these, so they fold the same BNs and give the same reasons for the ones they leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from ..core.blocked import Blocked
from .layers import AFFINE_LAYERS, forward_fold_blocker, in_channels, out_channels, zero_padded_conv
from .nodes import describe_node, skip_identity_down, skip_identity_up


@dataclass(frozen=True)
class ForwardFold:
    """Where the fold goes: every layer the BN feeds (one per branch) and how each takes it."""

    into: tuple[fx.Node, ...]
    #: the pooling and reshape calls the map passes on its way
    through: tuple[str, ...]
    #: per layer in ``into``: "weights" (its weight and bias) or "border-corrected" (a zero-padded
    #: conv plus the constant map its padding makes)
    forms: tuple[Literal["weights", "border-corrected"], ...]


@dataclass(frozen=True)
class NoFold:
    """Why the BN does not fold forward; ``border`` when a border correction would fold it."""

    reason: str
    border: bool = False


@dataclass(frozen=True)
class BackwardFold:
    """Where a backward fold goes: the Conv/Linear that feeds the BN, and nothing else."""

    into: fx.Node


def backward_fold(
    node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    channels: int,
    label: Callable[[fx.Node], str] = lambda n: str(n.target),
) -> BackwardFold | NoFold:
    """The fold-backward rule for the map at ``node`` (a BN or kept affine with ``channels``
    channels): the layer that feeds it takes it, ``BN(L(x)) = L′(x)``. Links that change nothing
    in eval mode (Identity slots) are passed. convert's fold-backward move and deployment's
    fuse-backward ask this."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return NoFold("no Conv/Linear directly before the BN to fold into (input is no node)")
    source = skip_identity_up(source, modules)
    layer = modules.get(str(source.target)) if source.op == "call_module" else None
    if not isinstance(layer, AFFINE_LAYERS):
        return NoFold(
            f"no Conv/Linear directly before the BN to fold into (input is {describe_node(source, modules)})"
        )
    if len(source.users) > 1:
        return NoFold(f"{label(source)} also feeds other nodes, so the BN cannot be folded into it")
    if calls.get(str(source.target), 0) > 1:
        return NoFold(f"{label(source)} is called at several places")
    if out_channels(layer) != channels:
        return NoFold(f"{label(source)} output channels do not match the BN")
    return BackwardFold(source)


def forward_fold(
    node: fx.Node,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    channels: int,
    *,
    positive: bool,
    padded: bool = False,
    label: Callable[[fx.Node], str] = lambda n: str(n.target),
) -> ForwardFold | NoFold:
    """The fold-forward rule for the BN (or kept affine) at ``node`` with ``channels`` channels.

    ``positive``: every scale of its map is positive; ``padded``: a zero-padded conv takes the
    fold with a border correction; ``label`` names nodes in reasons.
    """
    targets, through, blocked_by = consumers(node, modules, positive)
    if blocked_by:
        return NoFold(blocked_by)
    if not targets:
        users = list(skip_identity_down(node, modules).users)
        feeds = ", ".join(describe_node(u, modules) for u in users) or "nothing"
        return NoFold(f"no single Conv/Linear right after the BN to fold into (feeds {feeds})")
    forms: list[Literal["weights", "border-corrected"]] = []
    for target in targets:
        layer = modules.get(str(target.target)) if target.op == "call_module" else None
        if layer is None or not isinstance(layer, AFFINE_LAYERS):
            what = (
                "no single Conv/Linear right after the BN to fold into"
                if len(targets) == 1
                else "it feeds several layers, and not each is a Conv/Linear to fold into"
            )
            feeds = ", ".join(describe_node(t, modules) for t in targets)
            return NoFold(f"{what} (feeds {feeds})")
        refused = use_refusal(target, layer, calls, channels, label(target))
        if refused is not None:
            return NoFold(refused)
        blocked = forward_fold_blocker(layer)
        if blocked and zero_padded_conv(layer) and padded:
            forms.append("border-corrected")
            continue
        if blocked:
            return NoFold(f"cannot fold into {label(target)}: {blocked}", border=zero_padded_conv(layer))
        forms.append("weights")
    return ForwardFold(tuple(targets), tuple(through), tuple(forms))


def use_refusal(
    target: fx.Node, layer: nn.Module, calls: dict[str, int], channels: int, label: str
) -> str | None:
    """Why the Conv/Linear ``layer``, called at ``target``, cannot take a BN's map whatever its own
    kind (`bnmove.analysis.layers.forward_fold_blocker` says that): it is called at several places,
    or reads other channels than the BN's. None: its use allows the fold. The forward fold and the
    gate fold (`bnmove.deploy.gate`) both ask this."""
    if calls.get(str(target.target), 0) > 1:
        return f"{label} is called at several places"
    if in_channels(layer) != channels:
        return f"{label} input channels do not match the BN"
    return None


_MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


_FLATTENS = {torch.flatten, "flatten"}


def _pass_through(node: fx.Node, modules: dict[str, nn.Module], positive: bool) -> bool | Blocked:
    """True when a per-channel affine map passes ``node`` unchanged (``pool(a*z+b) = a*pool(z)+b``),
    why not when it does not, False when ``node`` is no pooling or reshape at all."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, _ADAPTIVE_AVG) or isinstance(module, nn.Flatten):
            return True
        if isinstance(module, _AVG_POOLS):
            if getattr(module, "divisor_override", None) is not None:
                return Blocked(f"{node.target} divides by a fixed count, which the BN's shift does not pass")
            padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
            if any(p != 0 for p in padding) and module.count_include_pad:  # type: ignore[union-attr]
                return Blocked(f"{node.target} averages zero padding, which the BN's shift does not pass")
            return True
        if isinstance(module, _MAX_POOLS):
            if not positive:
                return Blocked(f"{node.target} takes a maximum, which a negative BN scale does not pass")
            return True
        return False
    if node.target in _FLATTENS and len(node.args) >= 2 and node.args[1] == 1 and len(node.users) == 1:
        return True
    if node.op in ("call_function", "call_method"):
        return _functional_pass_through(node, positive)
    return False


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _functional_pass_through(node: fx.Node, positive: bool) -> bool | Blocked:
    """The functional forms: ``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``F.max_pool2d``, spatial ``mean``."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.startswith("adaptive_avg_pool"):
        return True
    if name.startswith(("max_pool", "adaptive_max_pool")):
        return (
            True if positive else Blocked(f"{name} takes a maximum, which a negative BN scale does not pass")
        )
    if name.startswith("avg_pool"):
        padding = _arg(node, 3, "padding", 0)
        padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
        if _arg(node, 6, "divisor_override", None) is not None:
            return Blocked(f"{name} divides by a fixed count, which the BN's shift does not pass")
        if padded and _arg(node, 5, "count_include_pad", True):
            return Blocked(f"{name} averages zero padding, which the BN's shift does not pass")
        return True
    if name == "mean":
        dims = _arg(node, 1, "dim", None)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        # over spatial dimensions only (named by positive index): each channel's mean, shifted alike
        return all(isinstance(d, int) and d >= 2 for d in dims)
    return False


def consumers(
    node: fx.Node, modules: dict[str, nn.Module], positive: bool
) -> tuple[list[fx.Node], list[str], str | None]:
    """Every node the output of ``node`` reaches past links, pooling and flatten (one per
    branch), what the way passed, or why a single way stopped (a blocked branch, or a way longer
    than 8 steps, gives no nodes and no reason: the BN then has no single layer to fold into)."""
    through: list[str] = []
    found: list[fx.Node] = []
    frontier = [skip_identity_down(node, modules)]
    for _ in range(8):
        following = []
        branched = len(frontier) > 1 or any(len(current.users) > 1 for current in frontier)
        for current in frontier:
            for user in current.users:
                passes = _pass_through(user, modules, positive)
                if isinstance(passes, Blocked):
                    return [], through, None if branched else passes.reason
                if passes is False:
                    found.append(user)
                    continue
                through.append(
                    str(user.target)
                    if user.op == "call_module"
                    else getattr(user.target, "__name__", str(user.target))
                )
                following.append(skip_identity_down(user, modules))
        if not following:
            return found, through, None
        frontier = following
    return [], through, None

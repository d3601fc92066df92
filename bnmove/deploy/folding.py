"""Deployment folding: fold BNs that sit after their activation forward into the next layer.

The fold passes through what commutes with a per-channel affine map: links,
average pooling without counted padding, adaptive average pooling, flatten,
and max pooling when every scale is positive (ResNet's stem ``relu -> BN ->
maxpool -> conv``). Kept affine layers (:class:`~bnmove.core.affine.ChannelAffine`,
left by exact moves where no layer absorbed a BN) fold forward by the same rules.

A BN right after a Conv/Linear is fused into it by the exporter and by
onnxruntime. Nothing fuses a BN that follows an activation: on CUDA it stays a
separate memory-bound kernel. Where its only user is a Linear, an unpadded Conv
or a pointwise ConvTranspose, ``N(BN(z)) = N'(z)`` exactly (``bn_math``), so the
BN can disappear from the deployed graph. The result is for inference: the
folded BN no longer normalises in train mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from ..analysis.detect import absorbing_layer
from ..analysis.layers import forward_fold_blocker, in_channels, out_channels, zero_padded_conv
from ..analysis.patterns import is_batchnorm_module, is_plain_batchnorm, skip_identity_down, skip_identity_up
from ..analysis.regions import analysis_regions
from ..core import bn_math
from ..core.affine import ChannelAffine
from ..core.clone import clone_module
from ..core.modules import set_submodule
from ..moving.rewrite import affine_map, fold_bn
from .border import BorderCorrectedConv, absorb_following, border_corrected


@dataclass(frozen=True)
class BnFate:
    """What happened to one BatchNorm in the deployed graph."""

    bn: str
    #: "folded-forward", "fused-backward" (by the exporter/runtime) or "standalone"
    fate: str
    into: str | None = None
    reason: str | None = None
    #: the pooling/reshape calls the fold passed through on its way to ``into``
    through: tuple[str, ...] = ()
    #: how a folded-forward BN went in: "weights" (scale and bias of ``into``) or "border-corrected"
    #: (into a zero-padded conv, plus the constant map its padding makes: see ``border.py``)
    form: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Folding:
    """The result of :func:`bnmove.fold_forward`: the model with BNs folded forward where exact,
    and every BN's fate (folded, fused backward, or standalone with the reason)."""

    model: nn.Module
    bns: list[BnFate]

    @property
    def standalone(self) -> list[BnFate]:
        return [b for b in self.bns if b.fate == "standalone"]


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fate(
    node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int], prefix: str, padded: bool
) -> BnFate:
    name = _qual(prefix, str(node.target))
    module = modules[str(node.target)]
    kept = isinstance(module, ChannelAffine)
    if not kept and (not is_plain_batchnorm(module) or module.running_mean is None):  # type: ignore[union-attr]
        return BnFate(name, "standalone", reason="not a plain BatchNorm with running statistics")
    if calls[str(node.target)] > 1:
        return BnFate(name, "standalone", reason="called at several places")
    source = node.args[0]
    if isinstance(source, fx.Node):
        source = skip_identity_up(source, modules)
    if isinstance(source, fx.Node) and len(source.users) == 1:
        layer = absorbing_layer(source, modules)
        if layer is not None and out_channels(layer) == module.num_features:  # type: ignore[union-attr]
            return BnFate(name, "fused-backward", into=_qual(prefix, str(source.target)))
    targets, through, blocked_by = _consumers(node, modules, _scale_positive(module))
    if blocked_by:
        return BnFate(name, "standalone", reason=blocked_by)
    target = targets[0] if len(targets) == 1 else None
    if len(targets) > 1:  # several branches: a fold into each of them, where every one absorbs it
        several = _several_consumers(targets, through, module, modules, calls, prefix, padded, name)
        if several is not None:
            return several
    layer = absorbing_layer(target, modules) if target is not None else None
    if target is None or layer is None:
        users = list(skip_identity_down(node, modules).users)
        feeds = ", ".join(str(u.target) if u.op == "call_module" else u.name for u in users) or "nothing"
        return BnFate(name, "standalone", reason=f"no single Conv/Linear after it (feeds {feeds})")
    if calls[str(target.target)] > 1:
        return BnFate(name, "standalone", reason=f"{target.target} is called at several places")
    if in_channels(layer) != module.num_features:  # type: ignore[union-attr]
        return BnFate(name, "standalone", reason=f"{target.target} input channels do not match")
    into = _qual(prefix, str(target.target))
    blocked = forward_fold_blocker(layer)
    if blocked and zero_padded_conv(layer):
        if padded:
            return BnFate(name, "folded-forward", into=into, through=tuple(through), form="border-corrected")
        blocked += " (--fold-padded folds it with a border correction)"
    if blocked:
        return BnFate(name, "standalone", reason=f"{target.target}: {blocked}")
    return BnFate(name, "folded-forward", into=into, through=tuple(through), form="weights")


def _several_consumers(
    targets: list[fx.Node],
    through: list[str],
    module: nn.Module,
    modules: dict[str, nn.Module],
    calls: dict[str, int],
    prefix: str,
    padded: bool,
    name: str,
) -> BnFate | None:
    """``N_i(a·u + b) = N_i'(u)`` for every layer ``N_i`` the BN feeds: the fold into each, when
    every one of them absorbs it exactly (None when one does not: the BN stays standalone)."""
    forms = set()
    for target in targets:
        layer = absorbing_layer(target, modules)
        if layer is None or calls.get(str(target.target), 0) != 1:
            return None
        if in_channels(layer) != module.num_features:  # type: ignore[union-attr]
            return None
        blocked = forward_fold_blocker(layer)
        if blocked and not (padded and zero_padded_conv(layer)):
            return None
        forms.add("border-corrected" if blocked else "weights")
    into = ", ".join(_qual(prefix, str(t.target)) for t in targets)
    form = forms.pop() if len(forms) == 1 else "weights and border-corrected"
    return BnFate(name, "folded-forward", into=into, through=tuple(through), form=form)


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


def _scale_positive(module: nn.Module) -> bool:
    a, _ = affine_map(module)
    return bool((a > 0).all())


def _pass_through(node: fx.Node, modules: dict[str, nn.Module], positive: bool) -> str | bool | None:
    """True when a per-channel affine map passes ``node`` unchanged (``pool(a*z+b) = a*pool(z)+b``),
    a reason string when it does not, False when ``node`` is no pooling or reshape at all."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, _ADAPTIVE_AVG) or isinstance(module, nn.Flatten):
            return True
        if isinstance(module, _AVG_POOLS):
            if getattr(module, "divisor_override", None) is not None:
                return f"{node.target} divides by a fixed count, which the BN's shift does not pass"
            padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
            if any(p != 0 for p in padding) and module.count_include_pad:  # type: ignore[union-attr]
                return f"{node.target} averages zero padding, which the BN's shift does not pass"
            return True
        if isinstance(module, _MAX_POOLS):
            if not positive:
                return f"{node.target} takes a maximum, which a negative BN scale does not pass"
            return True
        return False
    if node.target in _FLATTENS and len(node.args) >= 2 and node.args[1] == 1 and len(node.users) == 1:
        return True
    if node.op in ("call_function", "call_method"):
        return _functional_pass_through(node, positive)
    return False


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _functional_pass_through(node: fx.Node, positive: bool) -> str | bool:
    """The functional forms: ``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``F.max_pool2d``, spatial ``mean``."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.startswith("adaptive_avg_pool"):
        return True
    if name.startswith(("max_pool", "adaptive_max_pool")):
        return True if positive else f"{name} takes a maximum, which a negative BN scale does not pass"
    if name.startswith("avg_pool"):
        padding = _arg(node, 3, "padding", 0)
        padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
        if _arg(node, 6, "divisor_override", None) is not None:
            return f"{name} divides by a fixed count, which the BN's shift does not pass"
        if padded and _arg(node, 5, "count_include_pad", True):
            return f"{name} averages zero padding, which the BN's shift does not pass"
        return True
    if name == "mean":
        dims = _arg(node, 1, "dim", None)
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        # over spatial dimensions only (named by positive index): each channel's mean, shifted alike
        return all(isinstance(d, int) and d >= 2 for d in dims)
    return False


def _consumers(
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
                if isinstance(passes, str):
                    return [], through, None if branched else passes
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


def fold_forward(model: nn.Module, *, padded: bool = False) -> Folding:
    """Fold every BN that cannot be fused backward into the layer after it, where exact.

    With ``padded``, BNs before zero-padded convs fold too, as a
    :class:`~bnmove.deploy.border.BorderCorrectedConv` (exact for every input
    size; ``Conv`` + a constant ``Add`` once exported). Returns a copy of
    ``model`` and the fate of each BatchNorm.
    """
    work = clone_module(model)
    traced = analysis_regions(work)
    fates: list[BnFate] = []
    for prefix, region in traced.regions.items():
        modules = dict(region.root.named_modules())
        calls: dict[str, int] = {}
        for node in region.graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        for node in list(region.graph.nodes):
            module = modules.get(str(node.target), nn.Identity()) if node.op == "call_module" else None
            if module is None or not (is_batchnorm_module(module) or isinstance(module, ChannelAffine)):
                continue  # BNs, and the affine maps exact moves kept, fold the same way
            fate = _fate(node, modules, calls, prefix, padded)
            fates.append(fate)
            if fate.fate == "folded-forward":
                users, _, _ = _consumers(node, modules, True)
                assert users, fate
                for user in users:
                    layer = modules[str(user.target)]
                    if forward_fold_blocker(layer) and zero_padded_conv(layer):
                        a, b = affine_map(modules[str(node.target)])
                        device = layer.weight.device  # type: ignore[union-attr]
                        corrected = border_corrected(layer, a.to(device), b.to(device))  # type: ignore[arg-type]
                        set_submodule(region.root, str(user.target), corrected)
                    else:
                        fold_bn(region.root, str(node.target), str(user.target), bn_math.fold_into_following)
                # The BN's slot computes nothing now; every forward stays the user's.
                set_submodule(region.root, str(node.target), nn.Identity())
            elif fate.fate == "fused-backward":
                source = skip_identity_up(node.args[0], modules)  # type: ignore[arg-type]
                layer = region.root.get_submodule(str(source.target))
                if isinstance(layer, BorderCorrectedConv):  # an earlier forward fold put an Add after it
                    a, b = affine_map(modules[str(node.target)])
                    absorb_following(layer, a, b)
                    set_submodule(region.root, str(node.target), nn.Identity())
    return Folding(work, fates)

"""Deployment folding: fold BNs that sit after their activation forward into the next layer.

The fold passes through what commutes with a per-channel affine map: links,
average pooling without counted padding, adaptive average pooling, flatten,
and max pooling when every scale is positive (ResNet's stem ``relu -> BN ->
maxpool -> conv``). Kept affine layers ([`ChannelAffine`][bnmove.core.affine.ChannelAffine],
left by exact moves where no layer absorbed a BN) fold forward by the same rules.

A BN right after a Conv/Linear is fused into it by the exporter and by
onnxruntime. Nothing fuses a BN that follows an activation: on CUDA it stays a
separate memory-bound kernel. Where its only user is a Linear, an unpadded Conv
or a pointwise ConvTranspose, ``N(BN(z)) = N'(z)`` exactly (``bn_math``), so the
BN can disappear from the deployed graph. A BN that feeds a squeeze-and-excitation
gate and the product it scales folds into the gate and the projection, with a
per-sample bias from the gate vector (`gate`). A BN whose eval-mode map is
the identity (BN′ of an exact move, which only normalises in training) is removed
wherever it stands. The result is for inference: the folded BN no longer
normalises in train mode.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from ..analysis.batchnorms import bn_channels, is_batchnorm_module, is_plain_batchnorm
from ..analysis.folds import ForwardFold, NoFold, forward_fold
from ..analysis.layers import AFFINE_LAYERS, out_channels
from ..analysis.nodes import skip_identity_up
from ..analysis.patterns import match_activation
from ..analysis.regions import analysis_regions
from ..core.affine import ChannelAffine, affine_map, is_identity, scale_positive
from ..core.choices import Choice
from ..core.clone import clone_module
from ..core.modules import qualified, set_submodule
from ..rules import Context
from ..rules.fold_backward import backward_fold
from ..rules.table import fold_map
from .border import BorderCorrectedConv, absorb_following, border_corrected
from .gate import GateFold, apply_gate_fold, gate_fold


class Fate(Choice):
    """What became of one BatchNorm in the deployed graph (a ``str``: manifests hold its value)."""

    #: folded into the layers it feeds (`bnmove.analysis.folds.forward_fold`, or a gate)
    FOLDED_FORWARD = "folded-forward"
    #: fused into the Conv/Linear before it, by the exporter and onnxruntime (the rule
    #: `bnmove.rules.fold_backward` asks)
    FUSED_BACKWARD = "fused-backward"
    #: removed: its eval-mode map is the identity, as an exact move leaves BN′
    IDENTITY = "identity"
    #: left as a layer of its own, with the reason
    STANDALONE = "standalone"


@dataclass(frozen=True)
class BnFate:
    """What happened to one BatchNorm in the deployed graph."""

    bn: str
    fate: Fate
    into: str | None = None
    reason: str | None = None
    #: the pooling/reshape calls the fold passed through on its way to ``into``
    through: tuple[str, ...] = ()
    #: how a folded-forward BN went in: "weights" (scale and bias of ``into``) or "border-corrected"
    #: (into a zero-padded conv, plus the constant map its padding makes: see ``border.py``)
    form: str | None = None
    #: the layer before a positively homogeneous activation that took the BN's scale magnitudes
    #: (only the signs and the shift folded forward)
    scale_into: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Folding:
    """The result of [`bnmove.deploy.fold_forward`][bnmove.deploy.fold_forward]: the model with BNs folded forward where exact,
    and every BN's fate (folded, fused backward, or standalone with the reason)."""

    model: nn.Module
    bns: list[BnFate]

    @property
    def standalone(self) -> list[BnFate]:
        return [b for b in self.bns if b.fate is Fate.STANDALONE]

    def manifest(self) -> dict[str, Any]:
        """What an export's manifest records of the folding: every BN's fate, and those left."""
        return {
            "bns": [b.to_dict() for b in self.bns],
            "standalone_bns": [b.to_dict() for b in self.standalone],
        }


IDENTITY_REASON = (
    "the identity in eval mode, to float rounding (an exact move leaves it to normalise in "
    "training): removed from the deployed graph"
)


def _fate(
    node: fx.Node, context: Context, prefix: str, padded: bool, gates: bool
) -> tuple[BnFate, ForwardFold | GateFold | None]:
    name = qualified(prefix, str(node.target))
    modules, calls = context.modules, context.calls
    module = modules[str(node.target)]
    kept = isinstance(module, ChannelAffine)
    if not kept and (not is_plain_batchnorm(module) or module.running_mean is None):  # type: ignore[union-attr]
        return BnFate(name, Fate.STANDALONE, reason="not a plain BatchNorm with running statistics"), None
    if is_identity(module):
        return BnFate(name, Fate.IDENTITY, reason=IDENTITY_REASON), None
    if calls[str(node.target)] > 1:
        return BnFate(name, Fate.STANDALONE, reason="called at several places"), None
    channels = affine_map(module)[0].numel()
    backward = backward_fold(node, context, channels)  # the rule convert's exact before -> after move asks
    if backward.ok:
        return BnFate(name, Fate.FUSED_BACKWARD, into=context.label(backward.into[0])), None
    fold = forward_fold(node, modules, calls, channels, positive=scale_positive(module), padded=padded)
    if isinstance(fold, NoFold):
        gate = (
            gate_fold(node, modules, calls, channels, scale_positive(module), context.label)
            if gates
            else None
        )
        if isinstance(gate, GateFold):
            into = f"{context.label(gate.gate)}, {context.label(gate.into)}"
            return BnFate(name, Fate.FOLDED_FORWARD, into=into, form="gate"), gate
        if isinstance(gate, NoFold):
            return BnFate(name, Fate.STANDALONE, reason=f"gate fold: {gate.reason}"), None
        hint = " (--fold-padded folds it with a border correction)" if fold.border and not padded else ""
        return BnFate(name, Fate.STANDALONE, reason=fold.reason + hint), None
    forms = set(fold.forms)
    form = forms.pop() if len(forms) == 1 else "weights and border-corrected"
    into = ", ".join(qualified(prefix, str(t.target)) for t in fold.into)
    return BnFate(name, Fate.FOLDED_FORWARD, into=into, through=fold.through, form=form), fold


def _scale_source(node: fx.Node, context: Context, channels: int) -> fx.Node | None:
    """The layer behind a positively homogeneous activation behind ``node``: ``L → f → BN`` with
    ``f(c·z) = c·f(z)`` for ``c > 0`` (ReLU, LeakyReLU, PReLU), each output read once. ``L`` is a
    Conv/Linear, or an affine BN with running statistics (a before-placement BN, which the runtime
    fuses into the layer before it)."""
    modules, calls = context.modules, context.calls
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    act = skip_identity_up(source, modules)
    call = match_activation(act, modules)
    if call is None or not call.spec.positively_homogeneous or len(act.users) != 1 or len(source.users) != 1:
        return None
    before = act.args[0] if act.args else None
    if not isinstance(before, fx.Node):
        return None
    layer = skip_identity_up(before, modules)
    module = modules.get(str(layer.target)) if layer.op == "call_module" else None
    takes_scale = isinstance(module, AFFINE_LAYERS) or (
        module is not None
        and is_plain_batchnorm(module)
        and getattr(module, "affine", False)
        and getattr(module, "running_mean", None) is not None
    )
    if (
        module is None
        or not takes_scale
        or len(layer.users) != 1
        or len(before.users) != 1
        or calls.get(str(layer.target), 0) != 1
        or (bn_channels(module) if is_batchnorm_module(module) else out_channels(module)) != channels
    ):
        return None
    return layer


def _split_scale(
    root: nn.Module, node: fx.Node, context: Context, a: torch.Tensor
) -> tuple[torch.Tensor, str | None]:
    """Move ``|a|`` behind the activation where it is positively homogeneous:
    ``a·f(z) + b = sign(a)·f(|a|·z) + b``, the layer before ``f`` takes ``|a|`` per output channel
    (a scale per-channel weight quantization absorbs), and what folds forward is ``sign(a)`` and
    ``b``: the next layer's weights keep their magnitudes. Returns the scale left to fold forward."""
    layer = _scale_source(node, context, a.numel())
    if layer is None:
        return a, None
    target = root.get_submodule(str(layer.target))
    while isinstance(target, nn.Identity) and isinstance(layer.args[0], fx.Node):
        # a BN already absorbed by the border-corrected conv before it: that conv takes the scale
        layer = skip_identity_up(layer.args[0], context.modules)
        target = root.get_submodule(str(layer.target)) if layer.op == "call_module" else nn.Identity()
    if not isinstance(target, (*AFFINE_LAYERS, BorderCorrectedConv)) and not is_batchnorm_module(target):
        return a, None
    scale, zeros = a.abs(), torch.zeros_like(a)
    if isinstance(target, BorderCorrectedConv):  # an earlier forward fold made it one
        absorb_following(target, scale, zeros)
    elif is_batchnorm_module(target):  # |a|·BN(x): its weight and bias scale per channel
        with torch.no_grad():
            for tensor in (target.weight, target.bias):
                assert isinstance(tensor, torch.Tensor)
                tensor.mul_(scale.to(tensor))
    else:
        fold_map(root, scale, zeros, str(layer.target), "backward")
    return torch.sign(a), context.label(layer)


def fold_forward(model: nn.Module, *, padded: bool = False) -> Folding:
    """Fold every BN that cannot be fused backward into the layer after it, where exact.

    With ``padded``, BNs before zero-padded convs fold too, as a
    `BorderCorrectedConv` (exact for every input
    size; ``Conv`` + a constant ``Add`` once exported). Returns a copy of
    ``model`` and the fate of each BatchNorm.
    """
    work = clone_module(model)
    traced = analysis_regions(work)
    fates: list[BnFate] = []
    for prefix, region in traced.regions.items():
        context = Context.of(region, prefix)
        modules = context.modules
        gated = False
        for node in list(region.graph.nodes):
            module = modules.get(str(node.target), nn.Identity()) if node.op == "call_module" else None
            if module is None or not (is_batchnorm_module(module) or isinstance(module, ChannelAffine)):
                continue  # BNs, and the affine maps exact moves kept, fold the same way
            fate, fold = _fate(node, context, prefix, padded, gates=not region.recorded)
            if fold is not None:
                a, b = affine_map(modules[str(node.target)])
                a, scaled = _split_scale(region.root, node, context, a)
                fate = replace(fate, scale_into=scaled)
            fates.append(fate)
            if isinstance(fold, GateFold):
                apply_gate_fold(region.root, region.graph, fold, a, b)
                set_submodule(region.root, str(node.target), nn.Identity())
                gated = True
            elif fold is not None:
                for user, how in zip(fold.into, fold.forms, strict=True):
                    layer = modules[str(user.target)]
                    if how == "border-corrected":
                        device = layer.weight.device  # type: ignore[union-attr]
                        corrected = border_corrected(layer, a.to(device), b.to(device))  # type: ignore[arg-type]
                        set_submodule(region.root, str(user.target), corrected)
                    else:
                        fold_map(region.root, a, b, str(user.target), "forward")
                # The BN's slot computes nothing now; every forward stays the user's.
                set_submodule(region.root, str(node.target), nn.Identity())
            elif fate.fate is Fate.IDENTITY:
                set_submodule(region.root, str(node.target), nn.Identity())
            elif fate.fate is Fate.FUSED_BACKWARD:
                source = skip_identity_up(node.args[0], modules)  # type: ignore[arg-type]
                layer = region.root.get_submodule(str(source.target))
                if isinstance(layer, BorderCorrectedConv):  # an earlier forward fold put an Add after it
                    a, b = affine_map(modules[str(node.target)])
                    absorb_following(layer, a, b)
                    set_submodule(region.root, str(node.target), nn.Identity())
        if gated:  # the gate's bias joins the projection's output: the region runs its rewritten graph
            region.graph.lint()
            rewritten = region.graph_module()
            if prefix:
                set_submodule(work, prefix, rewritten)
            else:
                work = rewritten
    return Folding(work, fates)

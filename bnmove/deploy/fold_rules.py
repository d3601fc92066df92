"""Deployment folds as rules: what becomes of each BN (or kept affine) in the deployed graph.

Each rule matches a BN, checks it (it applies, with what it found, or a reason, the one the
manifest and ``inspect --deploy`` show) and applies it to the working copy. `fold_forward` walks
them in this order; the first that applies decides the BN's `Fate`:

====================  =====================================================  ================
rule                  what it does                                           fate
====================  =====================================================  ================
``remove-identity``   a BN whose eval-mode map is the identity (the BN′ an   ``identity``
                      exact move leaves) is removed wherever it stands
``fuse-backward``     ``L → BN``: the exporter and onnxruntime fuse it        ``fused-backward``
                      into ``L`` (the same check as convert's
                      `bnmove.rules.fold_backward` rule)
``fold-forward``      ``BN → N``: the map goes into every layer it feeds,    ``folded-forward``
                      ``N(a·u + b) = N′(u)`` (`bnmove.analysis.folds`),
                      into zero-padded convs with a border correction
                      where asked (`bnmove.deploy.border`)
``fold-into-gate``    a BN feeding a squeeze-and-excitation gate and the     ``folded-forward``
                      product it scales (`bnmove.deploy.gate`)
====================  =====================================================  ================

``split-scale`` goes with the two forward folds: behind a positively homogeneous activation
(``a·f(z) + b = sign(a)·f(|a|·z) + b``) the scale magnitudes go into the layer before ``f``, and
only the signs and the shift fold forward. Before any rule, a BN must be a plain BatchNorm with
running statistics (or a kept affine); before the folds, it must be called once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from ..analysis.batchnorms import bn_channels, has_eval_map, is_batchnorm_module
from ..analysis.folds import ForwardFold, NoFold, backward_fold, forward_fold
from ..analysis.layers import AFFINE_LAYERS, out_channels
from ..analysis.nodes import skip_identity_up
from ..analysis.patterns import match_activation
from ..core.affine import ChannelAffine, affine_map, is_identity, scale_positive
from ..core.modules import qualified, set_submodule
from ..rules import Context
from ..rules.table import fold_map
from .border import BorderCorrectedConv, absorb_following, border_corrected
from .fates import IDENTITY_REASON, BnFate, Fate
from .gate import GateFold, apply_gate_fold, gate_fold


@dataclass(frozen=True)
class Situation:
    """What every deployment rule reads about one BN: its node in the region's graph, the region's
    context, the BN (or kept affine) itself, and the folds asked for."""

    node: fx.Node
    context: Context
    prefix: str
    #: fold into zero-padded convs too (with a border correction)
    padded: bool
    #: the region's graph can be rewritten (a gate fold rewrites it)
    gates: bool

    @property
    def module(self) -> nn.Module:
        return self.context.modules[str(self.node.target)]

    @property
    def name(self) -> str:
        return qualified(self.prefix, str(self.node.target))

    @property
    def channels(self) -> int:
        return int(affine_map(self.module)[0].numel())


@dataclass(frozen=True)
class DeployCheck:
    """A rule's answer for one BN: it applies (``reason`` None), with where it goes, or why not."""

    reason: str | None = None
    #: the layer(s) the BN goes into, as the manifest names them
    into: str | None = None
    fold: ForwardFold | GateFold | None = None
    #: False when the BN is not in the rule's pattern at all (its reason then says nothing new)
    matched: bool = True

    @property
    def ok(self) -> bool:
        return self.reason is None


def refuse(reason: str) -> DeployCheck:
    return DeployCheck(reason=reason)


class DeployRule(ABC):
    """One thing deployment can do with a BN."""

    name: ClassVar[str]
    fate: ClassVar[Fate]

    def match(self, s: Situation) -> bool:
        return True

    @abstractmethod
    def check(self, s: Situation) -> DeployCheck:
        """Whether the rule applies to this BN, reading only."""

    @abstractmethod
    def apply(self, root: nn.Module, s: Situation, check: DeployCheck) -> BnFate:
        """Change ``root`` (the region's root) and say what became of the BN."""


class RemoveIdentity(DeployRule):
    """A BN whose eval-mode map is the identity, to float rounding, computes nothing in eval mode:
    its slot becomes ``nn.Identity``, wherever it stands."""

    name = "remove-identity"
    fate = Fate.IDENTITY

    def check(self, s: Situation) -> DeployCheck:
        return DeployCheck() if is_identity(s.module) else refuse("its eval-mode map is not the identity")

    def apply(self, root: nn.Module, s: Situation, check: DeployCheck) -> BnFate:
        set_submodule(root, str(s.node.target), nn.Identity())
        return BnFate(s.name, self.fate, reason=IDENTITY_REASON, rule=self.name)


class FuseBackward(DeployRule):
    """``L → BN`` with ``L`` a Conv/Linear the BN alone reads: the exporter and onnxruntime fuse the
    BN into ``L`` (convert's fold-backward check). Where an earlier forward fold made ``L`` a
    border-corrected conv, which ends in an Add, the BN goes into it here."""

    name = "fuse-backward"
    fate = Fate.FUSED_BACKWARD

    def check(self, s: Situation) -> DeployCheck:
        context = s.context
        backward = backward_fold(s.node, context.modules, context.calls, s.channels, context.label)
        if isinstance(backward, NoFold):
            return refuse(backward.reason)
        return DeployCheck(into=context.label(backward.into))

    def apply(self, root: nn.Module, s: Situation, check: DeployCheck) -> BnFate:
        source = skip_identity_up(s.node.args[0], s.context.modules)  # type: ignore[arg-type]
        layer = root.get_submodule(str(source.target))
        if isinstance(layer, BorderCorrectedConv):  # an earlier forward fold put an Add after it
            absorb_following(layer, *affine_map(s.module))
            set_submodule(root, str(s.node.target), nn.Identity())
        return BnFate(s.name, self.fate, into=check.into, rule=self.name)


class SplitScale:
    """Behind a positively homogeneous activation, ``a·f(z) + b = sign(a)·f(|a|·z) + b``: the layer
    before ``f`` takes ``|a|`` per output channel (a scale per-channel weight quantization absorbs),
    and what folds forward is ``sign(a)`` and ``b``: the next layer's weights keep their magnitudes."""

    name = "split-scale"

    def check(self, s: Situation) -> fx.Node | None:
        """The layer ``L`` in ``L → f → BN`` (``f(c·z) = c·f(z)`` for ``c > 0``: ReLU, LeakyReLU,
        PReLU), each output read once; ``L`` a Conv/Linear or an affine BN with running statistics
        (a before-placement BN, which the runtime fuses into the layer before it). None: no split."""
        node, modules, calls = s.node, s.context.modules, s.context.calls
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            return None
        act = skip_identity_up(source, modules)
        call = match_activation(act, modules)
        if (
            call is None
            or not call.spec.positively_homogeneous
            or len(act.users) != 1
            or len(source.users) != 1
        ):
            return None
        before = act.args[0] if act.args else None
        if not isinstance(before, fx.Node):
            return None
        layer = skip_identity_up(before, modules)
        module = modules.get(str(layer.target)) if layer.op == "call_module" else None
        takes_scale = isinstance(module, AFFINE_LAYERS) or (
            module is not None and has_eval_map(module) and getattr(module, "affine", False)
        )
        if (
            module is None
            or not takes_scale
            or len(layer.users) != 1
            or len(before.users) != 1
            or calls.get(str(layer.target), 0) != 1
            or (bn_channels(module) if is_batchnorm_module(module) else out_channels(module)) != s.channels
        ):
            return None
        return layer

    def apply(self, root: nn.Module, s: Situation, a: torch.Tensor) -> tuple[torch.Tensor, str | None]:
        """Move ``|a|`` into the layer before ``f``; returns the scale left to fold forward and the
        layer that took the magnitudes (None: no split, ``a`` folds forward whole)."""
        layer = self.check(s)
        if layer is None:
            return a, None
        target = root.get_submodule(str(layer.target))
        while isinstance(target, nn.Identity) and isinstance(layer.args[0], fx.Node):
            # a BN already absorbed by the border-corrected conv before it: that conv takes the scale
            layer = skip_identity_up(layer.args[0], s.context.modules)
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
        return torch.sign(a), s.context.label(layer)


SPLIT_SCALE = SplitScale()


class FoldForward(DeployRule):
    """``BN → N``: ``N(a·u + b) = N′(u)`` exactly for every layer ``N`` the BN feeds, through what
    commutes with a per-channel affine map (`bnmove.analysis.folds.forward_fold`); a zero-padded
    conv takes it with a border correction where ``padded`` (`bnmove.deploy.border`)."""

    name = "fold-forward"
    fate = Fate.FOLDED_FORWARD

    def check(self, s: Situation) -> DeployCheck:
        module, context = s.module, s.context
        fold = forward_fold(
            s.node,
            context.modules,
            context.calls,
            s.channels,
            positive=scale_positive(module),
            padded=s.padded,
        )
        if isinstance(fold, NoFold):
            hint = (
                " (--fold-padded folds it with a border correction)" if fold.border and not s.padded else ""
            )
            return refuse(fold.reason + hint)
        into = ", ".join(qualified(s.prefix, str(t.target)) for t in fold.into)
        return DeployCheck(into=into, fold=fold)

    def apply(self, root: nn.Module, s: Situation, check: DeployCheck) -> BnFate:
        fold = check.fold
        assert isinstance(fold, ForwardFold)
        a, b = affine_map(s.module)
        a, scaled = SPLIT_SCALE.apply(root, s, a)
        for user, how in zip(fold.into, fold.forms, strict=True):
            layer = s.context.modules[str(user.target)]
            if how == "border-corrected":
                device = layer.weight.device  # type: ignore[union-attr]
                corrected = border_corrected(layer, a.to(device), b.to(device))  # type: ignore[arg-type]
                set_submodule(root, str(user.target), corrected)
            else:
                fold_map(root, a, b, str(user.target), "forward")
        set_submodule(root, str(s.node.target), nn.Identity())  # its slot computes nothing now
        forms = set(fold.forms)
        form = forms.pop() if len(forms) == 1 else "weights and border-corrected"
        return BnFate(
            s.name,
            self.fate,
            into=check.into,
            through=fold.through,
            form=form,
            scale_into=scaled,
            rule=self.name,
        )


class FoldIntoGate(DeployRule):
    """A BN feeding a squeeze-and-excitation gate and the product it scales: the map passes the
    gate's global pooling into its first layer, and the projection that reads the product takes
    ``N((a·u + b)·s) = N_a(u·s) + W̄·(b ⊙ s)`` with a per-sample bias from the gate vector
    (`bnmove.deploy.gate`). Rewrites the region's graph, so only where that graph can run."""

    name = "fold-into-gate"
    fate = Fate.FOLDED_FORWARD

    def match(self, s: Situation) -> bool:
        return s.gates

    def check(self, s: Situation) -> DeployCheck:
        context = s.context
        gate = gate_fold(
            s.node, context.modules, context.calls, s.channels, scale_positive(s.module), context.label
        )
        if gate is None:
            return DeployCheck(reason="it feeds no gate", matched=False)
        if isinstance(gate, NoFold):
            return refuse(f"gate fold: {gate.reason}")
        return DeployCheck(into=f"{context.label(gate.gate)}, {context.label(gate.into)}", fold=gate)

    def apply(self, root: nn.Module, s: Situation, check: DeployCheck) -> BnFate:
        assert isinstance(check.fold, GateFold) and s.node.graph is not None
        a, b = affine_map(s.module)
        a, scaled = SPLIT_SCALE.apply(root, s, a)
        apply_gate_fold(root, s.node.graph, check.fold, a, b)  # type: ignore[arg-type]
        set_submodule(root, str(s.node.target), nn.Identity())
        return BnFate(s.name, self.fate, into=check.into, form="gate", scale_into=scaled, rule=self.name)


REMOVE_IDENTITY = RemoveIdentity()
FUSE_BACKWARD = FuseBackward()
FOLD_FORWARD = FoldForward()
FOLD_INTO_GATE = FoldIntoGate()

#: the folds, in the order a BN is offered to them (after `REMOVE_IDENTITY`)
FOLDS: tuple[DeployRule, ...] = (FUSE_BACKWARD, FOLD_FORWARD, FOLD_INTO_GATE)


def precondition(s: Situation) -> str | None:
    """Why no rule can take this BN at all: it is neither a kept affine nor a plain BatchNorm with
    running statistics."""
    module = s.module
    if isinstance(module, ChannelAffine):
        return None
    if not has_eval_map(module):
        return "not a plain BatchNorm with running statistics"
    return None


def decide(s: Situation) -> tuple[DeployRule | None, DeployCheck]:
    """The rule that takes this BN, with its check; or None with the reason it stays a BN."""
    why = precondition(s)
    if why is not None:
        return None, refuse(why)
    checked = REMOVE_IDENTITY.check(s)
    if checked.ok:
        return REMOVE_IDENTITY, checked
    if s.context.calls[str(s.node.target)] > 1:
        return None, refuse("called at several places")
    refusal = refuse("no fold applies")
    for rule in FOLDS:
        if rule.match(s):
            checked = rule.check(s)
            if checked.ok:
                return rule, checked
            if checked.matched:
                refusal = checked  # the last fold whose pattern the BN is in: the most specific reason
    return None, refusal

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
normalises in train mode. Each of these is a rule of `bnmove.deploy.fold_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..analysis.batchnorms import is_batchnorm_module
from ..analysis.regions import analysis_regions
from ..core.affine import ChannelAffine
from ..core.clone import clone_module
from ..core.modules import set_submodule
from ..rules import Context
from .fates import IDENTITY_REASON, BnFate, Fate
from .fold_rules import FOLD_INTO_GATE, Situation, decide

__all__ = ["IDENTITY_REASON", "BnFate", "Fate", "Folding", "fold_forward"]


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


def fold_forward(model: nn.Module, *, padded: bool = False) -> Folding:
    """Fold every BN that cannot be fused backward into the layer after it, where exact.

    With ``padded``, BNs before zero-padded convs fold too, as a
    `BorderCorrectedConv` (exact for every input
    size; ``Conv`` + a constant ``Add`` once exported). Returns a copy of
    ``model`` and the fate of each BatchNorm: the deployment rule that took it
    (`bnmove.deploy.fold_rules`), or the reason it stays.
    """
    work = clone_module(model)
    traced = analysis_regions(work)
    fates: list[BnFate] = []
    for prefix, region in traced.regions.items():
        context = Context.of(region, prefix)
        gated = False
        for node in list(region.graph.nodes):
            module = context.modules.get(str(node.target)) if node.op == "call_module" else None
            if module is None or not (is_batchnorm_module(module) or isinstance(module, ChannelAffine)):
                continue  # BNs, and the affine maps exact moves kept, fold the same way
            situation = Situation(node, context, prefix, padded, gates=not region.recorded)
            rule, checked = decide(situation)
            if rule is None:
                fates.append(BnFate(situation.name, Fate.STANDALONE, reason=checked.reason))
                continue
            fates.append(rule.apply(region.root, situation, checked))
            gated = gated or rule is FOLD_INTO_GATE
        if gated:  # the gate's bias joins the projection's output: the region runs its rewritten graph
            region.graph.lint()
            rewritten = region.graph_module()
            if prefix:
                set_submodule(work, prefix, rewritten)
            else:
                work = rewritten
    return Folding(work, fates)

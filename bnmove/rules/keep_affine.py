"""Keep the affine: a BN no layer absorbs moves exactly, its eval-mode map kept as a layer.

``X → BN → f`` becomes ``X → A → f → BN′`` and ``f → BN → Y`` becomes
``BN′ → f → A → Y``, with ``A(z) = a·z + b`` the BN's eval-mode map as a
[`ChannelAffine`][bnmove.core.affine.ChannelAffine] (the same device, dtype and train
flag) and BN′ the identity in eval mode (`_exact`). Deployment folds
``A`` forward where a layer takes it; ``method="fit"`` on the converted model
absorbs it (`absorb`). The rule applies wherever the BN has running
statistics: it is what an exact move does when no fold does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..analysis.batchnorms import bn_channels
from ..analysis.detect import Site
from ..core.affine import ChannelAffine, affine_map
from ._exact import ExactRule, identity
from ._parameters import _BatchNorm, batchnorm_at
from .base import Applied, Check, Context, Method


def kept_affine(bn: _BatchNorm) -> ChannelAffine:
    """The BN's eval-mode map ``a·z + b`` as a layer of its own (same device, dtype and train flag)."""
    a, b = affine_map(bn)
    ref = bn.running_mean
    assert ref is not None
    affine = ChannelAffine(bn_channels(bn), device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        affine.weight.copy_(a)
        affine.bias.copy_(b)
    affine.train(bn.training)
    return affine


class KeepAffine(ExactRule):
    name = "keep-affine"
    method = Method.EXACT_KEPT_AFFINE

    def check_map(self, site: Site, context: Context, bn: nn.Module) -> Check:
        return Check()  # any BN with an eval-mode map can keep it as a layer

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        bn = batchnorm_at(root, str(site.bn_node.target))
        kept = kept_affine(bn)
        return Applied(identity(root, site, bn, check.prime), kept=kept)

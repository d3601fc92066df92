"""Fold forward: ``f → BN → N`` becomes ``BN′ → f → N′``, eval outputs kept.

``N`` is every layer the BN feeds (one per branch), each a Linear, an unpadded
Conv or a pointwise ConvTranspose, reached past links, pooling and flatten
(`bnmove.analysis.folds.forward_fold`, which deployment's
``--fold-forward`` asks too). With the BN's eval-mode map ``a·u + b``::

    N′(u) = N(a·u + b)      W′ = W·a (per input channel),  c′ = c + Σ W·b

BN′ before ``f`` is the identity in eval mode, holding the statistics of the
Gaussian whose image under ``f`` has the old BN's (`_exact`).
"""

from __future__ import annotations

from torch import nn

from ..analysis.batchnorms import bn_channels
from ..analysis.detect import Site
from ..analysis.folds import NoFold, forward_fold
from ..core.affine import affine_map, scale_positive
from ._exact import ExactRule, identity
from ._parameters import batchnorm_at
from .base import Applied, Check, Context, refuse
from .table import fold_map


class FoldForward(ExactRule):
    name = "fold-forward"
    moves = "after"

    def check_map(self, site: Site, context: Context, bn: nn.Module) -> Check:
        fold = forward_fold(
            site.bn_node,
            context.modules,
            context.calls,
            bn_channels(bn),
            positive=scale_positive(bn),
            label=context.label,
        )
        return refuse(fold.reason) if isinstance(fold, NoFold) else Check(into=fold.into)

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        bn = batchnorm_at(root, str(site.bn_node.target))
        a, b = affine_map(bn)  # read once: every layer takes the same map
        for layer in check.into:
            fold_map(root, a, b, str(layer.target), "forward")
        return Applied(identity(root, site, bn, check.prime))

"""Fold backward: ``L → BN → f`` becomes ``L′ → f → BN′``, eval outputs kept.

``L`` is the Conv, ConvTranspose or Linear that feeds the BN. With the BN's
eval-mode map ``a·z + b`` (``a = γ/√(var+ε)``, ``b = β − a·mean``)::

    L′(x) = a·L(x) + b      W′ = a·W (per output channel),  c′ = a·c + b

so ``f(L′(x)) = f(BN(L(x)))``, and BN′ after ``f`` is the identity in eval mode
(`_exact`). The same check says whether deployment's exporter and
onnxruntime fuse a BN into the layer before it.
"""

from __future__ import annotations

from torch import fx, nn

from ..analysis import folds
from ..analysis.batchnorms import bn_channels
from ..analysis.detect import Site
from ..core.affine import affine_map
from ._exact import ExactRule, identity
from ._parameters import batchnorm_at
from .base import Applied, Check, Context, refuse
from .table import fold_map


def backward_fold(node: fx.Node, context: Context, channels: int) -> Check:
    """May the map at ``node`` (a BN or kept affine with ``channels`` channels) fold into the layer
    that feeds it? (`bnmove.analysis.folds.backward_fold`, beside the forward fold.)"""
    fold = folds.backward_fold(node, context.modules, context.calls, channels, context.label)
    return refuse(fold.reason) if isinstance(fold, folds.NoFold) else Check(into=(fold.into,))


class FoldBackward(ExactRule):
    name = "fold-backward"
    moves = "before"

    def check_map(self, site: Site, context: Context, bn: nn.Module) -> Check:
        return backward_fold(site.bn_node, context, bn_channels(bn))

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        bn = batchnorm_at(root, str(site.bn_node.target))
        (layer,) = check.into
        fold_map(root, *affine_map(bn), str(layer.target), "backward")
        return Applied(identity(root, site, bn, check.prime))

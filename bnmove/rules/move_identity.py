"""Move an identity: a BN whose eval-mode map is the identity moves alone, nothing folded or kept.

Every exact move leaves BN′ (``weight = √(var + ε)``, ``bias = mean``), which computes nothing in
eval mode. Moving it across ``f`` again needs no neighbour::

    L → BN′ → f  becomes  L → f → BN″        f → BN′ → N  becomes  BN″ → f → N

where a fold would scale a neighbour's weights by factors within a few ulps of one, and a kept
affine would add a layer that multiplies by one (an after-variant converted back to before kept
one per pair: 149 in a 150-block CNN, its forward a fifth slower). BN″ holds the statistics of its
new input, as every exact move's does (`_exact`). Leaving the map out changes eval outputs by no
more than evaluating it rounds them: the test is `bnmove.core.affine.is_identity`, the one
deployment's ``remove-identity`` asks. A BN′ that training has changed is no longer the identity
and folds or keeps its map as any other BN.
"""

from __future__ import annotations

from torch import nn

from ..analysis.detect import Site
from ..core.affine import is_identity
from ._exact import ExactRule, identity
from ._parameters import batchnorm_at
from .base import Applied, Check, Context, refuse

#: what a move by this rule says in the report
NOTE = "its eval-mode map is the identity: moved alone, no layer folded into or kept"


class MoveIdentity(ExactRule):
    name = "move-identity"

    def check_map(self, site: Site, context: Context, bn: nn.Module) -> Check:
        return Check() if is_identity(bn) else refuse("its eval-mode map is not the identity")

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        bn = batchnorm_at(root, str(site.bn_node.target))
        return Applied([NOTE, *identity(root, site, bn, check.prime)])

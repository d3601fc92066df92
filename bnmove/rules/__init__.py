"""Every kind of move, one rule each: the pairs it matches, a check with a reason, what it does.

=================  ===================================  =========================================
rule               moves                                when
=================  ===================================  =========================================
``move-identity``  either way, nothing folded or kept   the BN's eval map is the identity (exact)
``fold-backward``  ``L → BN → f`` to ``L′ → f → BN′``    a Conv/Linear feeds the BN alone (exact)
``fold-forward``   ``f → BN → N`` to ``BN′ → f → N′``    every layer the BN feeds takes it (exact)
``keep-affine``    either way, ``A`` kept as a layer    the BN has running statistics (exact)
``fit-after``      ``BN → f`` to ``f → BN′`` fitted      the activation can be evaluated
``fit-before``     ``f → BN`` to ``BN′ → f`` fitted      the activation can be evaluated
``swap``           either way, parameters as they were  always
``absorb``         a kept affine fitted into a BN       the pair is at its placement already
``split-fused``    a fused norm+act module in two       a torch module computes its activation
=================  ===================================  =========================================

The analysis settles each movable pair's exact rule once (`settle_exact`):
the identity's move when the BN computes nothing in eval mode (a BN′ an
earlier move left), else the fold for its placement, else the kept affine; what ``inspect`` shows as
``exact``, ``neighbour`` and ``keeps_affine`` is that rule and what its check
found. The plan (`bnmove.pipeline.plan`) picks the rule a method asks for,
and ``convert`` applies exactly that. Deployment asks the same fold checks
(`backward_fold`, `bnmove.analysis.folds.forward_fold`).
"""

from __future__ import annotations

from dataclasses import replace

from ..analysis.detect import Site
from ._exact import solve_primes
from ._parameters import pair_activation
from .absorb import Absorb
from .base import Applied, Check, Context, KeptAffine, Method, Rule
from .fit import FitAfter, FitBefore
from .fold_backward import FoldBackward
from .fold_forward import FoldForward
from .keep_affine import KeepAffine
from .move_identity import MoveIdentity
from .split_fused import SplitFused
from .swap import Swap

FOLD_BACKWARD = FoldBackward()
FOLD_FORWARD = FoldForward()
KEEP_AFFINE = KeepAffine()
MOVE_IDENTITY = MoveIdentity()
FIT_AFTER = FitAfter()
FIT_BEFORE = FitBefore()
SWAP = Swap()
ABSORB = Absorb()
SPLIT_FUSED = SplitFused()

RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (MOVE_IDENTITY, FOLD_BACKWARD, FOLD_FORWARD, KEEP_AFFINE, FIT_AFTER, FIT_BEFORE, SWAP, ABSORB)
}
#: the fold an exact move of a pair at each placement tries first
EXACT_FOLD = {"before": FOLD_BACKWARD, "after": FOLD_FORWARD}
#: the fit that moves a pair at each placement
FIT = {"before": FIT_AFTER, "after": FIT_BEFORE}


def settle_exact(site: Site, context: Context) -> Site:
    """The site with the exact rule of its movable pair decided, and its pair saying so.

    The identity's move when the BN's eval-mode map is the identity (nothing
    to fold or keep, no neighbour); else the fold for the pair's placement when
    its check passes; else the kept affine, with the fold's refusal as the
    pair's ``reason``; else (no running statistics) no exact move, with that reason.
    """
    placement = site.pair.placement
    assert placement is not None and site.pair.movable
    if MOVE_IDENTITY.check(site, context).ok:
        pair = replace(site.pair, exact=True, reason=None, neighbour=None, keeps_affine=False)
        return replace(site, pair=pair, exact_rule=MOVE_IDENTITY.name, neighbours=())
    fold = EXACT_FOLD[placement]
    checked = fold.check(site, context)
    if checked.ok:
        neighbour = ", ".join(context.label(n) for n in checked.into)
        pair = replace(site.pair, exact=True, reason=None, neighbour=neighbour, keeps_affine=False)
        return replace(site, pair=pair, exact_rule=fold.name, neighbours=checked.into)
    keeps = KEEP_AFFINE.check(site, context).ok
    pair = replace(site.pair, exact=keeps, reason=checked.reason, neighbour=None, keeps_affine=keeps)
    return replace(site, pair=pair, exact_rule=KEEP_AFFINE.name if keeps else None, neighbours=())


__all__ = [
    "ABSORB",
    "FIT",
    "FOLD_BACKWARD",
    "FOLD_FORWARD",
    "KEEP_AFFINE",
    "MOVE_IDENTITY",
    "RULES",
    "SPLIT_FUSED",
    "SWAP",
    "Applied",
    "Check",
    "Context",
    "KeptAffine",
    "Method",
    "Rule",
    "pair_activation",
    "settle_exact",
    "solve_primes",
]

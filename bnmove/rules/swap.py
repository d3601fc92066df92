"""Swap: the BN and the activation trade places and no parameter changes.

``BN → f`` becomes ``f → BN`` (or the reverse) with the BN's weights and
statistics as they were: the function changes, and training from the swapped
model is the experiment. It applies to every pair that can move.
"""

from __future__ import annotations

from torch import nn

from ..analysis.detect import Site
from .base import Applied, Check, Context, Method, Rule


class Swap(Rule):
    name = "swap"
    method = Method.SWAP

    def check(self, site: Site, context: Context) -> Check:
        return Check()

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        return Applied()

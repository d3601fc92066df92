"""Shared by the rule tests: which rule moved each pair, and the numbers before and after."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

import bnmove


def rules_used(result: bnmove.Conversion) -> Counter[str]:
    """How many pairs each rule moved (or, for ``absorb``, took a kept affine into)."""
    return Counter(m.rule for m in result.moves if m.rule is not None)


def relative_error(reference: nn.Module, converted: nn.Module, inputs: tuple[Any, ...]) -> float:
    with torch.no_grad():
        want, got = reference(*inputs), converted(*inputs)
    return float((want - got).abs().max() / want.abs().max())

"""Shared by the rule tests: which rule moved each pair, and the numbers before and after."""

from __future__ import annotations

import copy
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


def deployed(model: nn.Module, x: torch.Tensor, *, padded: bool = False) -> Any:
    """``fold_forward`` of ``model`` checked in float32 and float64: the folded model computes what
    the model computes (exactly, to each precision's rounding); returns the float32 folding."""
    from bnmove.deploy.folding import fold_forward

    folding = None
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        typed = copy.deepcopy(model).to(dtype).eval()
        folded = fold_forward(typed, padded=padded)
        with torch.no_grad():
            want, got = typed(x.to(dtype)), folded.model(x.to(dtype))
        error = float((want - got).abs().max() / want.abs().max())
        assert error <= tolerance, (dtype, error)
        folding = folding or folded
    return folding


def deploy_rules_used(folding: Any) -> Counter[str]:
    """How many BNs each deployment rule took (``"stays"``: left as BNs)."""
    return Counter(b.rule or "stays" for b in folding.bns)


def situations(model: nn.Module, *, padded: bool = False) -> dict[str, Any]:
    """Each BN's (and kept affine's) `Situation`, by name, as ``fold_forward`` offers it to the rules."""
    from bnmove.analysis.batchnorms import is_batchnorm_module
    from bnmove.analysis.regions import analysis_regions
    from bnmove.core.affine import ChannelAffine
    from bnmove.deploy.fold_rules import Situation
    from bnmove.rules import Context

    found = {}
    for prefix, region in analysis_regions(model).regions.items():
        context = Context.of(region, prefix)
        for node in region.graph.nodes:
            module = context.modules.get(str(node.target)) if node.op == "call_module" else None
            if module is not None and (is_batchnorm_module(module) or isinstance(module, ChannelAffine)):
                situation = Situation(node, context, prefix, padded, gates=not region.recorded)
                found[situation.name] = situation
    return found

"""The absorb rule: ``fit`` on a converted model takes each kept affine into the BN beside it."""

from __future__ import annotations

import copy

import torch
from rules_helpers import relative_error, rules_used
from test_rule_keep_affine import AddBnAct
from torch import nn
from zoo import randomize_bn

from bnmove import convert
from bnmove.core.affine import ChannelAffine
from bnmove.core.modules import set_submodule
from bnmove.pipeline.analyse import analyse
from bnmove.rules import ABSORB


def _kept(placement: str) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model, inputs = randomize_bn(AddBnAct()).eval(), (torch.randn(64, 4, 6, 6),)
    converted = convert(model, placement, method="exact", example_inputs=inputs).model
    assert sum(isinstance(m, ChannelAffine) for m in converted.modules()) == 1
    return model, converted, inputs


def _dropped(converted: nn.Module) -> nn.Module:
    """The naive alternative: the kept affine simply deleted."""
    naive = copy.deepcopy(converted)
    (name,) = [n for n, m in naive.named_modules() if isinstance(m, ChannelAffine)]
    set_submodule(naive, name, nn.Identity())
    return naive


def test_each_side_of_the_activation_is_absorbed_by_a_fit() -> None:
    for placement in ("after", "before"):  # A → f → BN′, then BN′ → f → A
        model, converted, inputs = _kept(placement)
        lean = convert(converted, placement, method="fit", example_inputs=inputs)
        assert rules_used(lean) == {"absorb": 1}
        (move,) = lean.absorbed
        assert not move.moved and move.effect is not None
        assert not any(isinstance(m, ChannelAffine) for m in lean.model.modules())
        # the fit carries the affine's effect: far closer to the original than deleting the affine
        fitted, dropped = (
            relative_error(model, lean.model, inputs),
            relative_error(model, _dropped(converted), inputs),
        )
        assert fitted < 0.6 * dropped, (placement, fitted, dropped)


def test_a_kept_affine_that_zeroes_a_channel_stays_with_the_reason() -> None:
    _, converted, inputs = _kept("after")  # A → f → BN′: A's input must be recovered from f's
    affine = next(m for m in converted.modules() if isinstance(m, ChannelAffine))
    with torch.no_grad():
        affine.weight[1] = 0.0
    analysis = analyse(converted, inputs)
    site = next(s for s in analysis.sites if s.pair.placement == "after")
    checked = ABSORB.check(site, analysis.contexts[site.region])
    assert checked.reason == "the kept affine zeroes a channel, so its input cannot be recovered"
    result = convert(converted, "after", method="fit", example_inputs=inputs)
    assert rules_used(result) == {}
    (stays,) = [m for m in result.moves if m.pair.bn == site.pair.bn and m.pair.placement == "after"]
    assert stays.reason == f"already after the activation; kept affine stays: {checked.reason}"

"""Deployment rule split-scale: behind a positively homogeneous activation the BN's scale magnitudes
go into the layer before it, ``a·f(z) + b = sign(a)·f(|a|·z) + b``; only signs and shift fold forward."""

from __future__ import annotations

import torch
from rules_helpers import deployed, situations
from torch import nn
from zoo import randomize_bn

from bnmove.deploy.fold_rules import SPLIT_SCALE


def _block(act: nn.Module) -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), act, nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))).eval()


def test_the_scale_goes_behind_a_relu_and_the_next_layer_keeps_its_magnitudes() -> None:
    model = _block(nn.ReLU())
    before = model[3].weight.detach().abs().clone()
    folding = deployed(model, torch.randn(2, 3, 8, 8))
    (fate,) = folding.bns
    assert (fate.rule, fate.scale_into) == ("fold-forward", "0")
    torch.testing.assert_close(folding.model[3].weight.detach().abs(), before)  # signs only


def test_no_split_behind_an_activation_that_is_not_positively_homogeneous() -> None:
    model = _block(nn.SiLU())
    assert SPLIT_SCALE.check(situations(model)["2"]) is None
    (fate,) = deployed(model, torch.randn(2, 3, 8, 8)).bns
    assert fate.rule == "fold-forward" and fate.scale_into is None

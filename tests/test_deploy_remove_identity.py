"""Deployment rule remove-identity: a BN whose eval-mode map is the identity (the BN′ an exact move
leaves) is removed from the deployed graph wherever it stands."""

from __future__ import annotations

import torch
from rules_helpers import deploy_rules_used, deployed, situations
from torch import nn
from zoo import randomize_bn

from bnmove import convert
from bnmove.deploy.fold_rules import REMOVE_IDENTITY
from bnmove.deploy.folding import IDENTITY_REASON, Fate


def test_the_bn_an_exact_move_leaves_is_removed_wherever_it_stands() -> None:
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    )
    x = torch.randn(2, 3, 8, 8)
    after = convert(model.eval(), "after", method="exact", example_inputs=(x,)).model
    folding = deployed(after, x)
    assert deploy_rules_used(folding) == {REMOVE_IDENTITY.name: 1}
    (fate,) = folding.bns
    assert (fate.fate, fate.reason) == (Fate.IDENTITY, IDENTITY_REASON)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folding.model.modules())


def test_a_bn_with_a_real_map_is_refused_with_the_reason() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))).eval()
    (situation,) = situations(model).values()
    assert REMOVE_IDENTITY.check(situation).reason == "its eval-mode map is not the identity"
    assert deploy_rules_used(deployed(model, torch.randn(2, 3, 8, 8))) == {"stays": 1}

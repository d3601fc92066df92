"""Deployment rule fold-forward: ``BN → N`` becomes ``N′`` exactly for every layer the BN feeds,
through pooling and flatten; into a zero-padded conv only with a border correction (``padded``)."""

from __future__ import annotations

import torch
from rules_helpers import deploy_rules_used, deployed, situations
from torch import nn
from zoo import randomize_bn

from bnmove.deploy.border import BorderCorrectedConv
from bnmove.deploy.fold_rules import FOLD_FORWARD
from bnmove.deploy.folding import Fate


def _after_block(padding: int) -> nn.Module:
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.Tanh(),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 2, 3, padding=padding),
            nn.Tanh(),
            nn.BatchNorm2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2, 3),
        )
    ).eval()


def test_bns_after_their_activation_fold_into_the_next_layer_through_pooling() -> None:
    folding = deployed(_after_block(padding=0), torch.randn(2, 3, 10, 10))
    assert deploy_rules_used(folding) == {FOLD_FORWARD.name: 2}
    assert [(b.bn, b.into, b.through, b.form) for b in folding.bns] == [
        ("2", "3", (), "weights"),
        ("5", "8", ("6", "7"), "weights"),
    ]


def test_a_padded_conv_is_refused_with_the_reason_unless_a_border_correction_is_asked() -> None:
    model = _after_block(padding=1)
    situation = situations(model)["2"]
    refused = FOLD_FORWARD.check(situation).reason
    assert refused is not None and "--fold-padded folds it with a border correction" in refused
    plain = deployed(model, torch.randn(2, 3, 10, 10))
    assert (plain.bns[0].bn, plain.bns[0].fate, plain.bns[0].reason) == ("2", Fate.STANDALONE, refused)
    padded = deployed(model, torch.randn(2, 3, 10, 10), padded=True)
    assert deploy_rules_used(padded) == {FOLD_FORWARD.name: 2} and padded.bns[0].form == "border-corrected"
    assert isinstance(padded.model[3], BorderCorrectedConv)

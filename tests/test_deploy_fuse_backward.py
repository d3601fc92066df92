"""Deployment rule fuse-backward: ``L → BN`` with a Conv/Linear ``L`` the BN alone reads is fused into
``L`` by the exporter and onnxruntime (the same check as convert's fold-backward rule)."""

from __future__ import annotations

import torch
from rules_helpers import deploy_rules_used, deployed, situations
from torch import nn
from zoo import randomize_bn

from bnmove.deploy.fold_rules import FUSE_BACKWARD
from bnmove.deploy.folding import Fate


def test_a_bn_right_after_its_conv_is_left_for_the_exporter_to_fuse() -> None:
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    ).eval()
    folding = deployed(model, torch.randn(2, 3, 8, 8))
    assert deploy_rules_used(folding) == {FUSE_BACKWARD.name: 2}
    assert [(b.bn, b.fate, b.into) for b in folding.bns] == [
        ("1", Fate.FUSED_BACKWARD, "0"),
        ("4", Fate.FUSED_BACKWARD, "3"),
    ]


def test_a_bn_whose_input_another_layer_reads_is_refused_with_the_reason() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.other = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + self.other(y)

    model = randomize_bn(Branching()).eval()
    situation = situations(model)["bn"]
    reason = FUSE_BACKWARD.check(situation).reason
    assert reason is not None and "conv" in reason
    (fate,) = deployed(model, torch.randn(2, 3, 5, 5)).bns
    assert fate.fate is Fate.STANDALONE and fate.rule is None

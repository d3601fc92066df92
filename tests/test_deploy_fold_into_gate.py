"""Deployment rule fold-into-gate: a BN after its activation that feeds a squeeze-and-excitation gate
and the product it scales folds into the gate's first layer and the projection."""

from __future__ import annotations

import torch
from rules_helpers import deploy_rules_used, deployed, situations
from test_gate_fold import InvertedResidual
from zoo import randomize_bn

from bnmove.deploy.fold_rules import FOLD_INTO_GATE


def test_the_depthwise_bn_folds_into_the_gate_and_the_projection() -> None:
    model = randomize_bn(InvertedResidual()).eval()
    folding = deployed(model, torch.randn(2, 4, 6, 6))
    assert deploy_rules_used(folding)[FOLD_INTO_GATE.name] == 1
    (gated,) = [b for b in folding.bns if b.rule == FOLD_INTO_GATE.name]
    assert (gated.bn, gated.form, gated.into) == ("dw.2", "gate", "se.fc1, project.0")


def test_a_spatial_gate_is_refused_with_the_reason() -> None:
    model = randomize_bn(InvertedResidual(pool="spatial")).eval()
    checked = FOLD_INTO_GATE.check(situations(model)["dw.2"])
    assert checked.matched and checked.reason is not None and checked.reason.startswith("gate fold: ")
    (dw,) = [b for b in deployed(model, torch.randn(2, 4, 6, 6)).bns if b.bn == "dw.2"]
    assert dw.rule is None and dw.reason == checked.reason

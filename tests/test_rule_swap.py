"""The swap rule: BN and activation trade places, no parameter changes, the function changes."""

from __future__ import annotations

import torch
from rules_helpers import relative_error, rules_used
from zoo import build

from bnmove import convert, find_pairs


def test_a_swap_changes_no_parameter_and_moves_every_movable_pair() -> None:
    model, inputs = build("resnet")
    movable = [p for p in find_pairs(model, inputs) if p.movable]
    result = convert(model, "after", method="swap", example_inputs=inputs)
    assert rules_used(result) == {"swap": len(movable)} and len(movable) == 4
    before = model.state_dict()
    after = result.model.state_dict()
    for move in result.moved:  # the BN's slot became Sequential(act, bn): the same tensors
        for key in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(before[f"{move.pair.bn}.{key}"], after[f"{move.moved_to}.{key}"])
    assert relative_error(model, result.model, inputs) > 0.01  # the function is not kept
    assert result.verification is not None and not result.verification.within_tolerance

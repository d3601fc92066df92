"""Moves across forwards: the BN in a child's forward, its activation in an ancestor's (or the reverse)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import ConvAct, ConvNorm, DenseTail, DropBlock, build

from bnmove import convert, find_pairs
from bnmove.core.forwards import GraphForward


def _generated(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(vars(m).get("forward"), GraphForward)]


@pytest.mark.parametrize("placement", ["after", "before"])
def test_function_in_the_parent_joins_the_bn_slot(placement: str) -> None:
    """DenseNet's ``F.relu(self.features(x))``: the ReLU joins ``features.1``; only the top forward is regenerated."""
    model, inputs = build("across-function")
    start = (
        model
        if placement == "after"
        else convert(model, "after", method="exact", example_inputs=inputs).model
    )
    other = "before" if placement == "after" else "after"
    result = convert(start, placement, method="exact", example_inputs=inputs)
    (move,) = result.moved
    assert move.pair.placement == other and move.method.startswith("exact")
    assert_same_outputs(model, result.model, inputs)
    assert type(result.model) is DenseTail
    if placement == "after":
        slot = result.model.features[1]
        assert isinstance(slot, nn.Sequential) and isinstance(slot[0], nn.ReLU)
        assert isinstance(slot[1], nn.BatchNorm2d) and move.moved_to == "features.1.1"
        assert _generated(result.model) == [""]  # the Sequential keeps torch's forward
        assert any("regenerated" in note for note in move.notes)
    (pair,) = [p for p in find_pairs(result.model, inputs) if p.placement]
    assert pair.placement == placement


def test_shared_module_called_twice_by_the_parent() -> None:
    model, inputs = build("across-shared-module")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert sorted(m.moved_to for m in result.moved) == ["conv1.bn.1", "conv2.bn.1"]
    assert result.model.conv1.bn[0] is result.model.act is result.model.conv2.bn[0]
    assert _generated(result.model) == [""]
    assert type(result.model.conv1).forward is ConvNorm.forward and "forward" not in vars(result.model.conv1)
    assert_same_outputs(model, result.model, inputs)
    # The converted model trains and survives pickling and deep copies with its generated forward.
    for again in (pickle.loads(pickle.dumps(result.model)), copy.deepcopy(result.model)):
        assert_same_outputs(model, again, inputs)
    result.model.train()(torch.cat([inputs[0]] * 2)).sum().backward()


def test_activation_in_the_child_bn_in_the_parent() -> None:
    """``self.bn(self.block(x))`` where ``block`` ends in ``F.silu``: the child's forward loses the call."""
    model, inputs = build("across-child-activation")
    result = convert(model, "before", method="exact", example_inputs=inputs)
    (move,) = result.moved
    assert move.moved_to == "bn.0" and isinstance(result.model.bn[1], nn.SiLU)
    assert _generated(result.model) == ["block"]
    assert type(result.model.block) is ConvAct
    assert_same_outputs(model, result.model, inputs)


def test_hooks_on_the_moved_bn_still_fire() -> None:
    model, inputs = build("across-function")
    seen: list[tuple[int, ...]] = []
    model.features[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    result = convert(model, "after", method="exact", example_inputs=inputs)
    seen.clear()
    result.model(*inputs)
    assert seen == [(2, 6, 8, 8)]


def test_an_untraceable_forward_is_unmovable_in_inspect_and_convert_alike() -> None:
    """``if drop_rate:`` on a float argument: the forward to regenerate does not trace on its own."""
    model, inputs = build("branching-forward")
    pairs = [p for p in find_pairs(model, inputs) if p.placement]
    assert [p.movable for p in pairs] == [False, False]
    reason = pairs[0].reason or ""
    assert "block (DropBlock), which torch.fx cannot trace" in reason and "if drop_rate" in reason
    for method in ("exact", "auto", "swap"):
        result = convert(model, "after", method=method, example_inputs=inputs)
        assert [(m.moved, m.reason) for m in result.moves] == [(False, p.reason) for p in pairs]
    assert isinstance(model.block, DropBlock)

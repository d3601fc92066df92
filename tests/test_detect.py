from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from zoo import ZOO, BasicBlock, build

import bnmove
from bnmove import find_pairs


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_pair_counts(name: str) -> None:
    case = ZOO[name]
    model, inputs = build(name)
    pairs = find_pairs(model, inputs)
    placed = Counter(p.placement for p in pairs)
    assert placed["before"] == case.before
    assert placed["after"] == case.after
    assert placed[None] == case.lone
    assert sum(p.exact for p in pairs) == case.exact
    assert sum(p.keeps_affine for p in pairs) == case.kept
    assert sum(not p.movable for p in pairs if p.placement) == case.immovable


def test_find_pairs_does_not_modify_model() -> None:
    model, inputs = build("fused")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    find_pairs(model, inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.bn1).__name__ == "BatchNormAct2d"


def test_resnet_names_and_reasons() -> None:
    model, _ = build("resnet")
    pairs = {p.bn: p for p in find_pairs(model)}
    assert pairs["bn1"].activation == "relu" and pairs["bn1"].neighbour == "conv1"
    # ReLU module shared by two call sites: stateless, so each site moves on its own.
    assert pairs["layer1.0.bn1"].movable and pairs["layer1.0.bn1"].exact
    lone = pairs["layer1.0.bn2"]
    assert lone.placement is None and not lone.movable
    assert "not adjacent" in (lone.reason or "") and "add" in (lone.reason or "")


def test_shared_bn_is_not_movable() -> None:
    class SharedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.conv(x))) + torch.relu(self.bn(x))

    pairs = find_pairs(SharedBN())
    assert len(pairs) == 2
    assert all(not p.movable and "called at 2 places" in (p.reason or "") for p in pairs)


def test_shared_prelu_is_not_movable() -> None:
    class SharedPReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
            self.act = nn.PReLU(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.bn1(x)) + self.act(self.bn2(x))

    pairs = find_pairs(SharedPReLU())
    assert [p.movable for p in pairs] == [False, False]
    assert "has parameters and is called at 2 places" in (pairs[0].reason or "")


def test_bn_output_with_second_user_is_not_movable() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return torch.sigmoid(y) + y  # (sigmoid(y) * y would be SiLU written out: one activation)

    (pair,) = find_pairs(Branchy())
    assert pair.placement == "before" and not pair.movable
    assert "also feeds add" in (pair.reason or "")


def test_track_running_stats_false_is_swap_only() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    (pair,) = find_pairs(model)
    assert pair.movable and not pair.exact
    assert "track_running_stats=False" in (pair.reason or "")


def test_padded_conv_blocks_the_fold_so_the_exact_move_keeps_the_affine() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))
    (pair,) = find_pairs(model)
    assert pair.placement == "after" and pair.movable and pair.exact and pair.keeps_affine
    assert pair.neighbour is None and "pads its input" in (pair.reason or "")


def test_untraceable_model_is_recorded_instead() -> None:
    model, inputs = build("untraceable-top")
    result = bnmove.detect(model, inputs)
    assert result.untraced == []  # one forward pass recorded on a copy sees through the checks
    assert {p.bn for p in result.pairs} == {"features.0.bn", "features.1.bn"}


def test_untraceable_parts_are_reported_without_an_input() -> None:
    model, _ = build("untraceable-top")
    model.features.insert(0, nn.Identity())  # the first layer no longer tells the input's shape
    result = bnmove.detect(model)
    assert [u.name for u in result.untraced] == ["<model>"]
    assert "TraceError" in result.untraced[0].reason or "raise" in result.untraced[0].reason.lower()
    assert {p.bn for p in result.pairs} == {"features.1.bn", "features.2.bn"}


def test_basic_block_alone() -> None:
    pairs = find_pairs(BasicBlock(4))
    assert [(p.bn, p.placement) for p in pairs] == [("bn1", "before"), ("bn2", None)]

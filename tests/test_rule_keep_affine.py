"""The keep-affine rule: a BN no layer absorbs moves exactly, its eval map kept as a ChannelAffine."""

from __future__ import annotations

import torch
from conftest import assert_same_outputs
from rules_helpers import rules_used
from torch import nn
from zoo import randomize_bn

from bnmove import convert, find_pairs
from bnmove.core.affine import ChannelAffine, affine_map
from bnmove.pipeline.analyse import analyse
from bnmove.rules import KEEP_AFFINE


class AddBnAct(nn.Module):
    """``add → BN → ReLU → conv(pad) → ReLU → BN → add``: no layer beside either BN takes a fold."""

    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4, track_running_stats=track)
        self.act1, self.conv, self.act2 = nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.GELU()
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.act1(self.bn1(x + 1)))
        return self.bn2(self.act2(y)) + x


def _model(track: bool = True) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return randomize_bn(AddBnAct(track)).eval(), (torch.randn(2, 4, 6, 6),)


def test_both_placements_keep_the_map_and_the_outputs() -> None:
    model, inputs = _model()
    for placement, moved in (("after", "bn1"), ("before", "bn2")):
        result = convert(model, placement, method="exact", example_inputs=inputs)
        assert rules_used(result) == {"keep-affine": 1}
        (move,) = result.moved
        assert move.pair.bn == moved and move.method == "exact-kept-affine"
        kept = [m for m in result.model.modules() if isinstance(m, ChannelAffine)]
        assert len(kept) == 1
        a, b = affine_map(getattr(model, moved))
        assert torch.allclose(kept[0].weight.double(), a) and torch.allclose(kept[0].bias.double(), b)
        assert_same_outputs(model, result.model, inputs)


def test_no_running_statistics_means_no_exact_move() -> None:
    model, inputs = _model(track=False)
    analysis = analyse(model, inputs)
    site = next(s for s in analysis.sites if s.pair.bn == "bn1" and s.pair.placement)
    checked = KEEP_AFFINE.check(site, analysis.contexts[site.region])
    assert checked.reason == "track_running_stats=False: the BN has no running statistics to fold"
    pair = next(p for p in find_pairs(model, inputs) if p.bn == "bn1" and p.placement)
    assert not pair.exact and pair.reason == checked.reason
    result = convert(model, "after", method="exact", example_inputs=inputs)
    (stays,) = [m for m in result.moves if m.pair.bn == "bn1"]
    assert not stays.moved and stays.reason == f"no exact move: {checked.reason}"

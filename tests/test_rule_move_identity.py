"""The move-identity rule: a BN whose eval map is the identity moves alone, nothing folded or kept."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_outputs
from rules_helpers import rules_used
from torch import nn
from zoo import randomize_bn

from bnmove import convert, find_pairs
from bnmove.core.affine import ChannelAffine, is_identity
from bnmove.pipeline.analyse import analyse
from bnmove.report.model import conversion_summary
from bnmove.rules import MOVE_IDENTITY


def _stack() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Two pairs whose after-variant keeps no affine, and one whose BN′ then feeds a padded conv."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.GELU(),
        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Hardswish(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 5),
    )  # fmt: skip
    return randomize_bn(model).eval(), (torch.randn(2, 3, 8, 8),)


def _layer_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every Conv's and the Linear's weight and bias."""
    return [t for m in model if isinstance(m, (nn.Conv2d, nn.Linear)) for t in (m.weight, m.bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_after_variant_goes_back_with_nothing_folded_or_kept(dtype: torch.dtype) -> None:
    model, inputs = _stack()
    model, inputs = model.to(dtype), tuple(x.to(dtype) for x in inputs)
    after = convert(model, "after", method="exact", example_inputs=inputs)
    assert rules_used(after) == {"fold-backward": 3}
    bns = [m for m in after.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 and all(is_identity(bn) for bn in bns)
    back = convert(after.model, "before", method="exact", example_inputs=inputs)
    assert rules_used(back) == {"move-identity": 3}
    assert not any(isinstance(m, ChannelAffine) for m in back.model.modules())
    assert [type(m).__name__ for m in back.model] == [type(m).__name__ for m in model]
    # no neighbour changed: every conv and the linear hold the after-variant's weights, bit for bit
    kept, now = _layer_tensors(after.model), _layer_tensors(back.model)
    assert len(now) == 8 and all(torch.equal(a, b) for a, b in zip(kept, now, strict=True))
    assert_same_outputs(model, back.model, inputs, rtol=1e-4 if dtype == torch.float32 else 1e-12)
    # BN″ holds the statistics of its new input, as every exact move's: the Gaussian whose image
    # under ReLU has BN′'s, which is the original BN's train-mode output N(beta, gamma²)
    first = back.model.get_submodule("1")
    assert is_identity(first)
    assert torch.allclose(first.running_mean.double(), model[1].bias.double(), atol=1e-5)
    assert torch.allclose(first.running_var.double(), model[1].weight.double() ** 2, rtol=1e-4)


def test_the_report_says_nothing_was_folded() -> None:
    model, inputs = _stack()
    after = convert(model, "after", method="exact", example_inputs=inputs).model
    back = convert(after, "before", method="exact", example_inputs=inputs)
    assert all(m.method == "exact" and m.rule == MOVE_IDENTITY.name for m in back.moved)
    assert all("eval-mode map is the identity" in " ".join(m.notes) for m in back.moved)
    assert "3 moved as the identity" in conversion_summary(back)
    pairs = [p for p in find_pairs(after, inputs) if p.placement]
    assert all(p.exact and p.neighbour is None and not p.keeps_affine and p.reason is None for p in pairs)


def test_a_bn_that_computes_something_is_refused_with_the_reason() -> None:
    model, inputs = _stack()
    after = convert(model, "after", method="exact", example_inputs=inputs).model
    trained = copy.deepcopy(after)
    with torch.no_grad():
        trained.get_submodule("4").weight.mul_(1.5)  # BN′ after the GELU, as training leaves it
    analysis = analyse(trained, inputs)
    by_bn = {s.pair.bn: s for s in analysis.sites if s.pair.placement}
    site = by_bn["4"]
    assert MOVE_IDENTITY.check(site, analysis.contexts[site.region]).reason == (
        "its eval-mode map is not the identity"
    )
    assert site.exact_rule == "keep-affine"  # the padded conv after it takes no fold
    back = convert(trained, "before", method="exact", example_inputs=inputs)
    assert rules_used(back) == {"move-identity": 2, "keep-affine": 1}
    assert_same_outputs(trained, back.model, inputs)
    # a BN with no running statistics has no eval-mode map, and is refused before the identity test
    untracked = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    analysis = analyse(untracked, inputs)
    site = next(s for s in analysis.sites if s.pair.placement)
    assert MOVE_IDENTITY.check(site, analysis.contexts[site.region]).reason == (
        "track_running_stats=False: the BN has no running statistics to fold"
    )

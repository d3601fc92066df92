"""The fold-forward rule (``analysis/folds.py``): one legality for convert's exact after -> before move
and for deployment's ``--fold-forward``/``--fold-padded``, with one set of reasons."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_outputs
from torch import nn
from zoo import randomize_bn

from bnmove import convert, find_pairs
from bnmove.deploy import fold_forward


class PoolThenLinear(nn.Module):
    """``relu -> BN -> avg pool -> flatten -> Linear``: the map passes the pooling into the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.bn, self.fc = (
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Linear(4, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.act(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TwoBranches(nn.Module):
    """``relu -> BN`` feeding two unpadded convs (a pre-activation block with a projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.bn = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)
        self.main, self.proj = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.act(self.conv(x)))
        return self.main(y) + self.proj(y)


class Padded(nn.Module):
    """``relu -> BN -> padded conv``: exact only with a border correction, which convert does not make."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.bn, self.next = (
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.next(self.bn(self.act(self.conv(x))))


class MaxPoolNegative(nn.Module):
    """``relu -> BN -> max pool -> conv`` with a negative BN scale: a maximum does not pass it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.bn = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)
        self.pool, self.next = nn.MaxPool2d(2), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.next(self.pool(self.bn(self.act(self.conv(x)))))


def _build(cls: type[nn.Module], negative: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    if negative:
        with torch.no_grad():
            model.bn.weight[0] = -abs(float(model.bn.weight[0])) - 0.5
    return model, (torch.randn(2, 3, 10, 10),)


@pytest.mark.parametrize(("cls", "into"), [(PoolThenLinear, "fc"), (TwoBranches, "main, proj")])
def test_the_rule_folds_through_pooling_and_into_every_branch(cls: type[nn.Module], into: str) -> None:
    model, inputs = _build(cls)
    (pair,) = [p for p in find_pairs(model, inputs) if p.placement]
    assert (pair.placement, pair.exact, pair.keeps_affine, pair.neighbour) == ("after", True, False, into)
    result = convert(model, "before", method="exact", example_inputs=inputs)
    (move,) = result.moved
    assert (move.method, move.rule) == ("exact", "fold-forward")  # folded: no ChannelAffine left behind
    assert not any(type(m).__name__ == "ChannelAffine" for m in result.model.modules())
    assert_same_outputs(model, result.model, inputs)
    wide, wide_inputs = copy.deepcopy(model).double(), tuple(x.double() for x in inputs)
    in_float64 = convert(wide, "before", method="exact", example_inputs=wide_inputs).model
    assert_same_outputs(wide, in_float64, wide_inputs, rtol=1e-12)
    (fate,) = fold_forward(model).bns
    assert (fate.fate, fate.into) == ("folded-forward", into)
    assert_same_outputs(model, fold_forward(model).model, inputs)


@pytest.mark.parametrize(("cls", "negative", "says"), [
    (Padded, False, "cannot fold into next: it pads its input"),
    (MaxPoolNegative, True, "pool takes a maximum, which a negative BN scale does not pass"),
])  # fmt: skip
def test_a_refusal_reads_the_same_in_inspect_convert_and_export(
    cls: type[nn.Module], negative: bool, says: str
) -> None:
    model, inputs = _build(cls, negative)
    (pair,) = [p for p in find_pairs(model, inputs) if p.placement]
    assert pair.keeps_affine and says in (pair.reason or "")
    (move,) = convert(model, "before", method="exact", example_inputs=inputs).moved
    assert move.method == "exact-kept-affine" and move.reason == pair.reason
    (fate,) = fold_forward(model).bns
    assert fate.fate == "standalone" and (fate.reason or "").startswith(pair.reason or "")


def test_border_correction_is_deployments_alone() -> None:
    model, inputs = _build(Padded)
    (fate,) = fold_forward(model).bns
    assert fate.reason is not None and fate.reason.endswith(
        "(--fold-padded folds it with a border correction)"
    )
    (fate,) = fold_forward(model, padded=True).bns
    assert (fate.fate, fate.form) == ("folded-forward", "border-corrected")
    assert_same_outputs(model, fold_forward(model, padded=True).model, inputs)

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import build, randomize_bn

import bnmove
from bnmove.deploy.folding import fold_forward


@pytest.mark.parametrize(
    ("name", "folded", "standalone"),
    [
        ("mlp", {"bn1.1": "fc2", "bn2": "fc3"}, 0),  # bn1 moved: its slot is Sequential(act, bn)
        ("nested", {"stage.1.bn": "stage.1.proj"}, 2),
        ("conv1d", {"bn2": "conv3"}, 1),
    ],
)
def test_fold_forward_after_variant(name: str, folded: dict[str, str], standalone: int) -> None:
    model, inputs = build(name)
    after = bnmove.convert(model, "after", example_inputs=inputs).model
    result = fold_forward(after)
    assert {b.bn: b.into for b in result.bns if b.fate == "folded-forward"} == folded
    assert len(result.standalone) == standalone
    assert all(b.reason for b in result.standalone)
    assert_same_outputs(after, result.model, inputs)
    remaining = {n for n, m in result.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    called = {p.bn for p in bnmove.find_pairs(result.model)}
    assert not (set(folded) & called) and set(folded).isdisjoint(remaining & called)


def test_fold_forward_leaves_conv_bn_for_the_runtime() -> None:
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    ).eval()
    result = fold_forward(model)
    assert [(b.bn, b.fate, b.into) for b in result.bns] == [("1", "fused-backward", "0")]
    x = torch.randn(2, 3, 6, 6)
    assert_same_outputs(model, result.model, (x,))


def test_kept_affine_folds_forward_like_a_batchnorm() -> None:
    torch.manual_seed(0)
    affine = bnmove.ChannelAffine(6)
    with torch.no_grad():
        affine.weight.uniform_(0.5, 1.5)
        affine.bias.normal_()
    model = nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), affine, nn.Linear(6, 3), nn.Tanh(), bnmove.ChannelAffine(3)
    )
    result = fold_forward(model)
    assert [(b.bn, b.fate, b.into) for b in result.bns] == [
        ("2", "folded-forward", "3"),
        ("5", "standalone", None),
    ]
    assert isinstance(result.model[2], nn.Identity)
    assert_same_outputs(model, result.model, (torch.randn(5, 4),))


def _bn(n: int, negative: bool = False) -> nn.BatchNorm2d:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(n).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        if negative:
            bn.weight[0] = -0.7
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize(
    ("pool", "negative", "fate", "through"),
    [
        (nn.MaxPool2d(3, 2, 1), False, "folded-forward", ("2",)),
        (nn.MaxPool2d(3, 2, 1), True, "standalone", ()),
        (nn.AvgPool2d(2), False, "folded-forward", ("2",)),
        (nn.AvgPool2d(3, 1, 1), False, "standalone", ()),
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), True, "folded-forward", ("2",)),
    ],
    ids=["maxpool", "maxpool-negative-scale", "avgpool", "avgpool-counting-padding", "avgpool-no-pad-count"],
)
def test_fold_through_pooling(pool: nn.Module, negative: bool, fate: str, through: tuple[str, ...]) -> None:
    model = nn.Sequential(nn.ReLU(), _bn(4, negative), pool, nn.Conv2d(4, 3, 1)).eval()
    result = fold_forward(model)
    (bn,) = result.bns
    assert (bn.fate, bn.through) == (fate, through)
    if fate == "standalone":
        assert "maximum" in (bn.reason or "") or "zero padding" in (bn.reason or "")
    assert_same_outputs(model, result.model, (torch.randn(2, 4, 7, 7),))


def test_fold_through_adaptive_pooling_and_flatten_into_a_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        _bn(4, negative=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    result = fold_forward(model)
    (bn,) = result.bns
    assert (bn.fate, bn.into, bn.through) == ("folded-forward", "5", ("3", "4"))
    assert isinstance(result.model[2], nn.Identity)
    assert_same_outputs(model, result.model, (torch.randn(2, 3, 6, 6),))

"""The fold table: (layer kind, direction) -> the fold, checked on each kind against the layer itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from bnmove import convert, sample_models
from bnmove.analysis.layers import AFFINE_LAYERS
from bnmove.core.affine import ChannelAffine
from bnmove.rules import RULES, Method
from bnmove.rules.table import FOLDS, fold_for, fold_map

LAYERS = {
    "conv1d": (nn.Conv1d(4, 6, 3, groups=2), (2, 4, 7)),
    "conv2d": (nn.Conv2d(4, 6, 3), (2, 4, 7, 7)),
    "conv3d": (nn.Conv3d(4, 6, 1), (2, 4, 3, 3, 3)),
    "convT1d": (nn.ConvTranspose1d(4, 6, 1, groups=2), (2, 4, 7)),
    "convT2d": (nn.ConvTranspose2d(4, 6, 1), (2, 4, 5, 5)),
    "convT3d": (nn.ConvTranspose3d(4, 6, 1, bias=False), (2, 4, 3, 3, 3)),
    "linear": (nn.Linear(4, 6), (5, 4)),
    "affine": (ChannelAffine(4), (2, 4, 5, 5)),
}


def test_every_layer_a_bn_folds_into_has_both_directions() -> None:
    kinds = {kind for kind, _ in FOLDS}
    assert kinds == set(AFFINE_LAYERS)
    assert all((kind, d) in FOLDS for kind in kinds for d in ("backward", "forward"))

    class SamePadConv(nn.Conv2d):  # a library subclass (timm's Conv2dSame) takes its base's fold
        pass

    assert fold_for(SamePadConv(2, 2, 1), "forward") is FOLDS[(nn.Conv2d, "forward")]
    with pytest.raises(LookupError, match="no backward fold for BatchNorm2d"):
        fold_for(nn.BatchNorm2d(2), "backward")


def _channels_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2))) if ndim > 2 else t.view(1, -1)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_the_folded_layer_computes_the_map_and_the_layer(name: str, direction: str) -> None:
    torch.manual_seed(0)
    layer, shape = LAYERS[name]
    layer = copy.deepcopy(layer).double()
    if isinstance(layer, ChannelAffine):
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0)
            layer.bias.normal_()
    x = torch.randn(shape, dtype=torch.float64)
    root = nn.Sequential(copy.deepcopy(layer))
    with torch.no_grad():
        y = layer(x)
    channels = y.shape[1] if direction == "backward" else x.shape[1]
    a = torch.rand(channels, dtype=torch.float64) + 0.5
    b = torch.randn(channels, dtype=torch.float64)
    fold_map(root, a, b, "0", direction)  # type: ignore[arg-type]
    with torch.no_grad():
        got = root(x)
        want = (
            y * _channels_view(a, y.dim()) + _channels_view(b, y.dim())
            if direction == "backward"
            else layer(x * _channels_view(a, x.dim()) + _channels_view(b, x.dim()))
        )
    assert torch.allclose(got, want, atol=1e-12), (got - want).abs().max()


def test_every_rule_reports_one_typed_method_that_says_whether_it_keeps_outputs() -> None:
    """``Move.method`` is a `Method`: the rules name theirs, exact and fitted are its properties (no
    string prefixes), and it prints and serialises as its value, as the JSON reports did."""
    assert {type(rule.method) for rule in RULES.values()} == {Method}
    assert [m.value for m in Method if m.exact] == ["exact", "exact-kept-affine"]
    assert [m.value for m in Method if m.fitted] == ["fit-data-free", "fit-calibrated", "fit-synthetic"]
    assert Method.fitted_on("calibrated") is Method.FIT_CALIBRATED
    assert json.dumps([Method.SWAP]) == '["swap"]' and f"{Method.EXACT_KEPT_AFFINE}" == "exact-kept-affine"
    model = sample_models.resnet().eval()
    x = torch.randn(2, 3, 8, 8)
    for method in ("exact", "fit", "swap"):
        for move in convert(model, "after", method=method, example_inputs=(x,)).moved:
            assert isinstance(move.method, Method)
            assert move.keeps_outputs == move.method.exact, (method, move.method)

"""The fold-backward rule: ``L → BN → f`` to ``L′ → f → BN′``, with ``L′ = a·L + b``."""

from __future__ import annotations

import copy

import torch
from conftest import assert_same_outputs
from rules_helpers import rules_used
from torch import nn
from zoo import randomize_bn

from bnmove import convert, find_pairs
from bnmove.deploy import fold_forward
from bnmove.pipeline.analyse import analyse
from bnmove.rules import FOLD_BACKWARD


def _stack() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 2, stride=2), nn.BatchNorm2d(4), nn.SiLU(),
        nn.Flatten(), nn.Linear(4 * 16 * 16, 5), nn.BatchNorm1d(5), nn.Tanh(),
    )  # fmt: skip
    return randomize_bn(model).eval(), (torch.randn(2, 3, 8, 8),)


def test_each_layer_kind_takes_the_fold_and_the_outputs_stay() -> None:
    model, inputs = _stack()
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert rules_used(result) == {"fold-backward": 3}
    assert [m.pair.neighbour for m in result.moved] == ["0", "3", "7"]
    assert_same_outputs(model, result.model, inputs)
    wide, wide_inputs = copy.deepcopy(model).double(), tuple(x.double() for x in inputs)
    assert_same_outputs(wide, convert(wide, "after", method="exact", example_inputs=wide_inputs).model,
                        wide_inputs, rtol=1e-12)  # fmt: skip
    # the folded layer computes a·L(x) + b, the old BN's eval map of L's output
    conv, bn = model[0], model[1]
    with torch.no_grad():
        assert torch.allclose(result.model[0](inputs[0]), bn(conv(inputs[0])), atol=1e-5)


class SharedConv(nn.Module):
    """The conv's output feeds the BN and a second branch: folding into it would change the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act, self.side = (
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.act(self.bn(y)) + self.side(y)


def test_the_check_refuses_with_the_reason_inspect_convert_and_export_give() -> None:
    torch.manual_seed(0)
    model, inputs = randomize_bn(SharedConv()).eval(), (torch.randn(2, 3, 8, 8),)
    analysis = analyse(model, inputs)
    (site,) = [s for s in analysis.sites if s.pair.placement]
    checked = FOLD_BACKWARD.check(site, analysis.contexts[site.region])
    assert checked.reason == "conv also feeds other nodes, so the BN cannot be folded into it"
    (pair,) = [p for p in find_pairs(model, inputs) if p.placement]
    assert pair.reason == checked.reason and pair.keeps_affine
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert rules_used(result) == {"keep-affine": 1} and result.moved[0].reason == checked.reason
    assert_same_outputs(model, result.model, inputs)
    (fate,) = fold_forward(model).bns
    assert fate.fate == "standalone"  # the exporter cannot fuse it backward either, for the same reason


def test_deployment_fuses_backward_what_the_rule_folds() -> None:
    model, _ = _stack()
    fates = fold_forward(model).bns
    assert [(f.fate, f.into) for f in fates] == [("fused-backward", n) for n in ("0", "3", "7")]

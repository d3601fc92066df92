"""Calibrated fitting by module hooks: constant passes over the data, any model, nothing touched."""

from __future__ import annotations

import torch
from torch import nn
from zoo import randomize_bn

import bnmove
from bnmove.sample_models import PreActResNet


class UntraceableTop(PreActResNet):
    """The top-level forward branches on the data: torch.fx cannot trace it whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            return super().forward(x)
        return torch.zeros(len(x), 10)


def _model(cls: type[PreActResNet] = PreActResNet, blocks: int = 2) -> PreActResNet:
    torch.manual_seed(0)
    model = cls(10, width=8, blocks=blocks, in_channels=1)
    return randomize_bn(model).eval()  # type: ignore[return-value]


def _passes(blocks: int) -> float:
    """Full forward passes' worth of conv calls during one calibrated fit conversion."""
    model = _model(blocks=blocks)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    calls = [0]
    for conv in convs:  # deep copies keep the hooks, so every copy's calls count
        conv.register_forward_hook(lambda *_, c=calls: c.__setitem__(0, c[0] + 1))
    data = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    result = bnmove.convert(
        model, "after", method="fit", calibration=bnmove.Calibration(data), example_inputs=(data[:2],)
    )
    assert result.moved and {m.method for m in result.moved} == {"fit-calibrated"}
    return calls[0] / len(convs)


def test_calibration_costs_a_constant_number_of_passes_whatever_the_depth() -> None:
    shallow, deep = _passes(2), _passes(12)
    # 4 pairs against 24: replaying the converted model up to each pair would grow ~6x
    assert deep <= shallow + 0.5, (shallow, deep)


def test_calibrated_fit_on_a_model_whose_top_level_does_not_trace() -> None:
    model = _model(UntraceableTop)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    data, fresh = torch.randn(200, 1, 8, 8, generator=g), torch.randn(100, 1, 8, 8, generator=g)
    example = (data[:2],)
    calibrated = bnmove.convert(
        model, "after", method="fit", calibration=bnmove.Calibration(data), example_inputs=example
    )
    free = bnmove.convert(model, "after", method="fit", example_inputs=example)
    assert {m.method for m in calibrated.moved} == {"fit-calibrated"}
    assert any(n.startswith("refitted ") for m in calibrated.moved for n in m.notes)
    with torch.no_grad():
        want = model(fresh)
        errors = [float((r.model.eval()(fresh) - want).abs().max()) for r in (calibrated, free)]
    assert errors[0] < 0.5 * errors[1], errors  # real data beats Gaussian guesses, on unseen samples
    # The user's model: same weights, no hook left behind, still in eval mode.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_a_pair_no_hook_reaches_keeps_its_gaussian_fit_and_says_so() -> None:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn, self.head = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(torch.relu(self.fc(x) * 2.0)))  # relu's input is a function's output

    model = randomize_bn(Functional()).eval()
    data = torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    result = bnmove.convert(
        model, "before", method="fit", calibration=bnmove.Calibration(data), example_inputs=(data[:4],)
    )
    (move,) = result.moved
    assert move.method == "fit-data-free"
    assert any("not the calibration data: no module hook reaches" in n for n in move.notes)

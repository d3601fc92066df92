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
    result = bnmove.convert(model, "after", method="fit", calibration_data=data, example_inputs=(data[:2],))
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
    calibrated = bnmove.convert(model, "after", method="fit", calibration_data=data, example_inputs=example)
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


def test_refitted_pairs_keep_the_original_bn_scale_and_the_function() -> None:
    """After BN' and the next layer are fitted, BN' is rescaled to the original BN's weight
    magnitudes and the layer takes the inverse: Adam's first fine-tuning steps then change BN' by
    as little as they would have changed the original. The function is the same either way."""
    from bnmove.fitting import sequential

    model = _model(blocks=2)
    data = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    fresh = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    result = bnmove.convert(model, "after", method="fit", calibration_data=data, example_inputs=(data[:2],))
    refitted = [m for m in result.moved if any(n.startswith("refitted ") for n in m.notes)]
    assert len(refitted) >= 2
    # The same conversion without the rescaling computes the same function.
    plain = sequential.SequentialCalibration._rebalance
    try:
        sequential.SequentialCalibration._rebalance = lambda self, plan, layer: None  # type: ignore[method-assign]
        unscaled = bnmove.convert(
            model, "after", method="fit", calibration_data=data, example_inputs=(data[:2],)
        )
    finally:
        sequential.SequentialCalibration._rebalance = plain  # type: ignore[method-assign]
    for move in refitted:
        original = model.get_submodule(move.pair.bn).weight.detach().abs().double()
        before = unscaled.model.get_submodule(move.moved_to).weight.detach().abs().double()
        after = result.model.get_submodule(move.moved_to).weight.detach().abs().double()
        assert not torch.allclose(before, original, rtol=0.1)  # the fit alone leaves other scales
        # original magnitudes, but never rescaled by more than 1000x either way
        want = before * (original / before.clamp_min(1e-12)).clamp(1e-3, 1e3)
        torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        a, b = result.model.eval()(fresh), unscaled.model.eval()(fresh)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert not torch.allclose(
        result.model.get_submodule(refitted[0].moved_to).weight,
        unscaled.model.get_submodule(refitted[0].moved_to).weight,
    )

"""Synthetic calibration inputs: they match every BN's statistics, deterministically, and touch nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnmove
from bnmove.fitting.synthetic import synthesize_inputs


def _model_with_statistics() -> nn.Sequential:
    """Conv-BN-ReLU-Conv-BN whose running statistics come from data far from N(0, 1)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6, momentum=None),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3),
        nn.BatchNorm2d(5, momentum=None),
    )
    g = torch.Generator().manual_seed(1)
    shift = torch.tensor([2.0, -1.0, 0.5])[None, :, None, None]
    with torch.no_grad():
        for _ in range(4):  # momentum=None: running stats are the exact average over these batches
            model(torch.randn(32, 3, 8, 8, generator=g) * 3 + shift)
    return model.eval()


def _statistics_errors(model: nn.Module, x: torch.Tensor) -> list[tuple[float, float]]:
    """Per BN: worst normalised mean error and worst log-variance error of its input over ``x``."""
    seen: dict[nn.Module, torch.Tensor] = {}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(mod, args[0])) for m in norms]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    errors = []
    for bn in norms:
        h = seen[bn].transpose(0, 1).flatten(1)
        assert bn.running_mean is not None and bn.running_var is not None
        mean_err = ((h.mean(1) - bn.running_mean).abs() / bn.running_var.sqrt()).max()
        var_err = (h.var(1, unbiased=False).log() - bn.running_var.log()).abs().max()
        errors.append((float(mean_err), float(var_err)))
    return errors


def test_synthetic_inputs_reproduce_every_bn_statistics() -> None:
    model = _model_with_statistics()
    x = synthesize_inputs(model, (torch.zeros(1, 3, 8, 8),), samples=96, batch_size=96, steps=300)
    assert x.shape == (96, 3, 8, 8)
    noise = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for (mean_err, var_err), (noise_mean, noise_var) in zip(
        _statistics_errors(model, x), _statistics_errors(model, noise), strict=True
    ):
        assert mean_err < 0.1 and var_err < 0.05
        assert max(noise_mean, noise_var) > 0.5  # the starting noise was far off


def test_synthetic_inputs_are_deterministic_and_leave_the_model_alone() -> None:
    model = _model_with_statistics().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = synthesize_inputs(model, (torch.zeros(1, 3, 8, 8),), samples=10, batch_size=4, steps=5, seed=3)
    b = synthesize_inputs(model, (torch.zeros(1, 3, 8, 8),), samples=10, batch_size=4, steps=5, seed=3)
    c = synthesize_inputs(model, (torch.zeros(1, 3, 8, 8),), samples=10, batch_size=4, steps=5, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_synthetic_inputs_report_progress() -> None:
    calls: list[tuple[int, int]] = []
    synthesize_inputs(
        _model_with_statistics(),
        (torch.zeros(1, 3, 8, 8),),
        samples=5,
        batch_size=2,
        steps=3,
        on_progress=lambda stage: calls.append((stage.done, stage.total)),
    )
    assert calls == [(i, 9) for i in range(1, 10)]  # 3 batches of 3 steps


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bn(a + b)


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch somewhere")


@pytest.mark.parametrize(
    ("model", "inputs", "error", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.zeros(1, 4),), bnmove.BnmoveError, "no BatchNorm"),
        (
            _TwoInputs(),
            (torch.zeros(1, 4), torch.zeros(1, 4)),
            bnmove.BnmoveError,
            "one floating-point input",
        ),
        (
            nn.Sequential(nn.BatchNorm1d(4)),
            (torch.zeros(1, 4, dtype=torch.long),),
            bnmove.BnmoveError,
            "floating",
        ),
        (_Fails(), (torch.zeros(1, 4),), bnmove.ModelRunError, "failed on synthetic inputs"),
    ],
    ids=["no-batchnorm", "two-inputs", "integer-input", "model-raises"],
)
def test_synthetic_inputs_refuse_what_they_cannot_do(model, inputs, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=message):
        synthesize_inputs(model, inputs, samples=2, steps=1)


def test_convert_refuses_calibration_data_and_synthetic_together() -> None:
    model = _model_with_statistics()
    with pytest.raises(bnmove.BnmoveError, match="not both"):
        bnmove.convert(
            model, "after", calibration=bnmove.Calibration(torch.zeros(4, 3, 8, 8), data_free="synthetic")
        )
    with pytest.raises(bnmove.BnmoveError, match="unknown data-free fitting"):
        bnmove.convert(model, "after", calibration=bnmove.Calibration(data_free="uniform"))


def test_synthetic_is_not_made_when_nothing_is_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("synthetic inputs made although every move is exact")

    monkeypatch.setattr("bnmove.fitting.synthetic.synthesize_inputs", fail)
    monkeypatch.setattr("bnmove.pipeline.calibration.synthesize_inputs", fail)
    model = _model_with_statistics()  # conv -> BN -> ReLU: exact
    result = bnmove.convert(
        model,
        "after",
        calibration=bnmove.Calibration(data_free="synthetic"),
        example_inputs=(torch.zeros(2, 3, 8, 8),),
    )
    assert [m.method for m in result.moved] == ["exact"]

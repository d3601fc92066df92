"""Numerical edge cases of the BN itself, devices, and in-place forms after a move."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_outputs, outputs_of
from torch import nn

import bnmove


def _pair_model(bn: nn.BatchNorm2d, act: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn, act or nn.GELU(), nn.Conv2d(4, 2, 1)).eval()


def _set(
    bn: nn.BatchNorm2d, mean: float, var: float, gamma: list[float] | None = None, beta: float = 0.3
) -> None:
    with torch.no_grad():
        bn.running_mean.fill_(mean)
        bn.running_var.fill_(var)
        if bn.affine:
            bn.weight.copy_(torch.tensor(gamma or [1.0, -1.0, 0.5, 2.0]))
            bn.bias.fill_(beta)


EDGE: dict[str, Callable[[], nn.BatchNorm2d]] = {
    "gamma-zero": lambda: nn.BatchNorm2d(4),
    "negative-gamma": lambda: nn.BatchNorm2d(4),
    "tiny-variance": lambda: nn.BatchNorm2d(4),
    "eps-momentum": lambda: nn.BatchNorm2d(4, eps=0.1, momentum=0.9),
    "momentum-none": lambda: nn.BatchNorm2d(4, momentum=None),
    "affine-false": lambda: nn.BatchNorm2d(4, affine=False),
}


@pytest.mark.parametrize("case", list(EDGE))
def test_exact_round_trip_on_edge_cases(case: str) -> None:
    bn = EDGE[case]()
    gamma = {"gamma-zero": [0.0, 1.0, 0.0, -2.0], "negative-gamma": [-1.0, -0.5, -3.0, -0.1]}.get(case)
    _set(bn, mean=0.2, var=1e-9 if case == "tiny-variance" else 0.7, gamma=gamma)
    model = _pair_model(bn)
    x = torch.randn(2, 3, 5, 5)
    after = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert len(after.moved) == 1
    assert_same_outputs(model, after.model, (x,), rtol=2e-4)
    new_bn = after.model.get_submodule("1")
    assert new_bn.eps == bn.eps and new_bn.momentum == bn.momentum and new_bn.affine
    assert torch.isfinite(new_bn.running_var).all() and (new_bn.running_var >= 0).all()
    back = bnmove.convert(after.model, "before", method="exact", example_inputs=(x,))
    assert_same_outputs(model, back.model, (x,), rtol=2e-4)


def test_bn_in_train_mode_stays_in_train_mode() -> None:
    model = _pair_model(nn.BatchNorm2d(4))
    _set(model[1], 0.1, 0.9)
    model[1].train()
    x = torch.randn(4, 3, 5, 5)
    result = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert result.model.get_submodule("1").training and not result.model.get_submodule("0").training
    assert result.verification is not None and result.verification.within_tolerance  # verified in eval


def test_model_on_cuda_keeps_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    model = _pair_model(nn.BatchNorm2d(4)).cuda()
    x = torch.randn(2, 3, 5, 5, device="cuda")
    result = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert {p.device.type for p in result.model.parameters()} == {"cuda"}
    assert_same_outputs(model, result.model, (x,))


INPLACE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F.relu(inplace=True)": lambda t: F.relu(t, inplace=True),
    "torch.relu_": torch.relu_,
    "Tensor.relu_": lambda t: t.relu_(),
    "F.leaky_relu_": lambda t: F.leaky_relu_(t, 0.1),
    "F.hardtanh(t, -1, 1, True)": lambda t: F.hardtanh(t, -1.0, 1.0, True),
}


class SharedInput(nn.Module):
    """add -> BN -> in-place act, and the add's output is read again after."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.act = act
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + 1.0
        return self.act(self.bn(y)) * 2 + y


@pytest.mark.parametrize("form", list(INPLACE))
def test_moved_inplace_functions_become_out_of_place(form: str) -> None:
    fn = INPLACE[form]
    model = SharedInput(fn).eval()
    _set(model.bn, 0.1, 0.5, gamma=[1.0, -1.0, 2.0], beta=0.2)
    x = torch.randn(2, 3, 4, 4)
    result = bnmove.convert(model, "after", method="swap", example_inputs=(x,))
    assert result.moved and "out-of-place" in " ".join(result.moved[0].notes)
    y = x + 1.0
    want = model.bn(fn(y.clone())) * 2 + y
    torch.testing.assert_close(outputs_of(result.model, (x,)), want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_a_fused_norm_act_model_converts_in_any_float_dtype(dtype: torch.dtype) -> None:
    """The fused norm+act split is verified in float64 whatever the model's dtype (it used to probe
    in the default dtype: "mixed dtype (CPU)" for a float64 or half model)."""
    from zoo import BatchNormAct2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = BatchNormAct2d(8, nn.SiLU)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bn(self.conv(x)))

    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():  # trained-like statistics, so the move is not trivial
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 1.5)
    model = model.to(dtype)
    x = torch.randn(2, 3, 8, 8).to(dtype)
    result = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert [(m.pair.bn, m.method) for m in result.moves] == [("bn", "exact")]
    assert isinstance(model.bn, BatchNormAct2d)  # the given model is unchanged
    want, got = model(x).double(), result.model(x).double()
    resolution = {torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert (want - got).abs().max() <= resolution * want.abs().max()


def test_outputs_holding_an_empty_tensor_are_verified() -> None:
    """A detector's output can hold an empty tensor (no box passed): every fidelity check skips it
    instead of failing in max() (the calibrated fit's check used to crash)."""

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
            self.norm, self.act2, self.head = nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            h = self.act(self.bn(self.conv(x)))
            scores = self.head(self.act2(self.norm(h + x.mean(1, keepdim=True)))).flatten(1)
            keep = scores > 1e9  # nothing passes
            return {"boxes": scores[keep].reshape(0, 4), "labels": keep.nonzero()[:, 1], "scores": scores}

    torch.manual_seed(0)
    model, x = Detector().eval(), torch.randn(4, 3, 8, 8)
    exact = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert exact.verification is not None and exact.verification.max_rel_error < 1e-5
    fitted = bnmove.convert(
        model,
        "after",
        method="fit",
        example_inputs=(x,),
        calibration=bnmove.Calibration(torch.randn(16, 3, 8, 8)),
    )
    assert fitted.calibration is not None and fitted.held_out is not None
    out = fitted.model(x)
    assert out["boxes"].shape == (0, 4) and out["labels"].numel() == 0
    error = (out["scores"] - model(x)["scores"]).abs().max()
    assert fitted.calibration.max_rel_error < 0.05 and error < 0.05 * model(x)["scores"].abs().max()

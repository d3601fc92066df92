"""Every BatchNorm kind and every activation in every call form is recognised and moved."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_outputs
from torch import nn
from zoo import randomize_bn

import bnmove
from bnmove.analysis.patterns import ACTIVATION_KINDS, activation_call, activation_spec

ACT_MODULES: dict[str, Callable[[], nn.Module]] = {
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": lambda: nn.LeakyReLU(0.2),
    "PReLU": lambda: nn.PReLU(6),
    "ELU": nn.ELU,
    "CELU": lambda: nn.CELU(0.7),
    "SELU": nn.SELU,
    "GELU": lambda: nn.GELU("tanh"),
    "SiLU": nn.SiLU,
    "Mish": nn.Mish,
    "Hardswish": nn.Hardswish,
    "Hardsigmoid": nn.Hardsigmoid,
    "Hardtanh": lambda: nn.Hardtanh(-0.5, 2.0),
    "Sigmoid": nn.Sigmoid,
    "Tanh": nn.Tanh,
    "Softplus": lambda: nn.Softplus(beta=2.0),
}

# (kind, callable applied to the BN output) for torch.*, F.*, tensor methods and in-place forms.
ACT_CALLS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "torch.relu": ("ReLU", torch.relu),
    "torch.relu_": ("ReLU", torch.relu_),
    "F.relu-inplace": ("ReLU", lambda x: F.relu(x, inplace=True)),
    "method.relu": ("ReLU", lambda x: x.relu()),
    "method.relu_": ("ReLU", lambda x: x.relu_()),
    "F.relu6": ("ReLU6", F.relu6),
    "F.leaky_relu_": ("LeakyReLU", lambda x: F.leaky_relu_(x, 0.3)),
    "F.elu": ("ELU", lambda x: F.elu(x, alpha=0.5)),
    "F.celu": ("CELU", F.celu),
    "torch.selu": ("SELU", torch.selu),
    "F.gelu": ("GELU", F.gelu),
    "F.silu-inplace": ("SiLU", lambda x: F.silu(x, inplace=True)),
    "F.mish": ("Mish", F.mish),
    "F.hardswish": ("Hardswish", F.hardswish),
    "F.hardsigmoid": ("Hardsigmoid", F.hardsigmoid),
    "F.hardtanh_": ("Hardtanh", F.hardtanh_),
    "torch.sigmoid": ("Sigmoid", torch.sigmoid),
    "method.sigmoid_": ("Sigmoid", lambda x: x.sigmoid_()),
    "torch.tanh": ("Tanh", torch.tanh),
    "method.tanh": ("Tanh", lambda x: x.tanh()),
    "F.softplus": ("Softplus", lambda x: F.softplus(x, beta=0.5)),
}


class Call(nn.Module):
    """conv -> BN -> fn -> conv1x1, fn given as a plain callable (traced as a function)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], bn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = bn
        self.out = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fn(self.bn(self.conv(x))))


def _roundtrip(model: nn.Module, x: torch.Tensor, kind: str) -> None:
    model = randomize_bn(model).eval()
    (pair,) = bnmove.find_pairs(model)
    assert (pair.activation_kind, pair.placement, pair.exact) == (kind, "before", True)
    after = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert_same_outputs(model, after.model, (x,))
    (moved,) = bnmove.find_pairs(after.model)
    assert (moved.placement, moved.exact) == ("after", True), moved
    back = bnmove.convert(after.model, "before", method="exact", example_inputs=(x,))
    assert_same_outputs(model, back.model, (x,))
    assert bnmove.find_pairs(back.model)[0].placement == "before"


def test_registry_covers_every_kind() -> None:
    assert set(ACT_MODULES) == set(ACTIVATION_KINDS)
    assert activation_spec("gelu").kind == "GELU"


@pytest.mark.parametrize("kind", list(ACT_MODULES))
def test_activation_module(kind: str) -> None:
    act = ACT_MODULES[kind]()
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), act, nn.Conv2d(6, 4, 1))
    _roundtrip(model, torch.randn(2, 3, 6, 6), kind)


@pytest.mark.parametrize("form", list(ACT_CALLS))
def test_activation_call_form(form: str) -> None:
    kind, fn = ACT_CALLS[form]
    _roundtrip(Call(fn, nn.BatchNorm2d(6)), torch.randn(2, 3, 6, 6), kind)


class MyBN(nn.BatchNorm2d):
    """A subclass that adds nothing to forward."""


BN_KINDS: dict[str, Callable[[], nn.Module]] = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(6),
    "SyncBatchNorm": lambda: nn.SyncBatchNorm(6),
    "subclass": lambda: MyBN(6),
    "eps-momentum": lambda: nn.BatchNorm2d(6, eps=1e-2, momentum=0.3),
    "affine-false": lambda: nn.BatchNorm2d(6, affine=False),
}


@pytest.mark.parametrize("bn", list(BN_KINDS))
def test_batchnorm_kinds(bn: str) -> None:
    _roundtrip(Call(nn.SiLU(), BN_KINDS[bn]()), torch.randn(2, 3, 6, 6), "SiLU")


def test_lazy_batchnorm() -> None:
    x = torch.randn(2, 3, 6, 6)
    model = Call(nn.GELU(), nn.LazyBatchNorm2d())
    (pair,) = bnmove.find_pairs(model)
    assert pair.placement == "before" and pair.movable and not pair.exact
    assert "not initialised" in (pair.reason or "")
    with pytest.raises(bnmove.BnmoveError, match="run one forward pass"):
        bnmove.convert(model, "after", example_inputs=(x,))
    with torch.no_grad():
        model.eval()(x)
    _roundtrip(model, x, "GELU")


def test_batchnorm1d_and_3d() -> None:
    mlp = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    _roundtrip(mlp, torch.randn(4, 5), "Tanh")
    vol = nn.Sequential(nn.Conv3d(2, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.Conv3d(6, 2, 1))
    _roundtrip(vol, torch.randn(2, 2, 4, 4, 4), "ReLU")


def test_functional_batch_norm_swaps() -> None:
    class Fn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("rm", torch.randn(4))
            self.register_buffer("rv", torch.rand(4) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(F.batch_norm(x, self.rm, self.rv, None, None, False, 0.1, 1e-5))

    model = Fn().eval()
    (pair,) = bnmove.find_pairs(model)
    assert pair.movable and not pair.exact and "functional" in (pair.reason or "")
    x = torch.randn(2, 4, 3, 3)
    result = bnmove.convert(model, "after", example_inputs=(x,))
    assert result.moved[0].method == "swap"
    want = F.batch_norm(torch.relu(x), model.rm, model.rv, None, None, False, 0.1, 1e-5)
    torch.testing.assert_close(result.model(x), want)


def test_one_activation_call_for_methods_and_functions_in_place_or_not() -> None:
    """A method name or a function, in place or not, with its constant arguments: the same values,
    and the input never written over."""
    z = torch.linspace(-3, 3, 13)
    for target, args, kwargs, want in (
        ("clamp", (-1.0, 1.0), {}, z.clamp(-1.0, 1.0)),
        ("relu_", (), {}, torch.relu(z)),
        (F.leaky_relu, (0.2,), {"inplace": True}, F.leaky_relu(z, 0.2)),
        (F.leaky_relu_, (0.2,), {}, F.leaky_relu(z, 0.2)),
        (torch.relu_, (), {}, torch.relu(z)),
    ):
        before = z.clone()
        got = activation_call(target, args, kwargs)(z)
        assert torch.equal(z, before), target  # out of place
        assert torch.equal(got, want), target

"""The pure math of bn_math against torch layers and brute force."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnmove.core import bn_math


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    """This module checks math to float64 precision; other modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
        bn.weight.copy_(torch.randn(c, generator=g))  # negative gammas included
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    return bn_math.bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def test_bn_affine_matches_batchnorm() -> None:
    bn = _bn(5)
    a, b = _affine(bn)
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(bn(x), a[None, :, None, None] * x + b[None, :, None, None])


LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, padding=1, bias=False),
    "conv-grouped": lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2),
    "depthwise": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6),
    "convT": lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
    "convT-grouped": lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_fold_into_preceding_conv(kind: str) -> None:
    layer = LAYERS[kind]().double()
    bn = _bn(layer.out_channels)
    a, b = _affine(bn)
    transposed = isinstance(layer, nn.ConvTranspose2d)
    w, bias = bn_math.fold_into_preceding(
        layer.weight, layer.bias, a, b, transposed=transposed, groups=layer.groups
    )
    x = torch.randn(2, layer.in_channels, 7, 7)
    fn = F.conv_transpose2d if transposed else F.conv2d
    got = fn(x, w, bias, layer.stride, layer.padding, groups=layer.groups)
    torch.testing.assert_close(got, bn(layer(x)))


def test_fold_into_preceding_linear() -> None:
    layer = nn.Linear(5, 4).double()
    bn = _bn(4)
    a, b = _affine(bn)
    w, bias = bn_math.fold_into_preceding(layer.weight, layer.bias, a, b)
    x = torch.randn(8, 5)
    want = a * layer(x) + b
    torch.testing.assert_close(F.linear(x, w, bias), want)


FOLLOWING = {
    "conv": lambda: nn.Conv2d(4, 6, 3),
    "conv-grouped-strided": lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False),
    "conv-dilated": lambda: nn.Conv2d(4, 6, 3, dilation=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, groups=4),
    "convT-pointwise-grouped": lambda: nn.ConvTranspose2d(4, 6, 1, groups=2),
    "linear": lambda: nn.Linear(4, 3),
}


@pytest.mark.parametrize("kind", list(FOLLOWING))
def test_fold_into_following(kind: str) -> None:
    layer = FOLLOWING[kind]().double()
    cin = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    bn = _bn(cin, seed=3)
    a, b = _affine(bn)
    transposed = isinstance(layer, nn.ConvTranspose2d)
    w, bias = bn_math.fold_into_following(
        layer.weight, layer.bias, a, b, transposed=transposed, groups=getattr(layer, "groups", 1)
    )
    if isinstance(layer, nn.Linear):
        z = torch.randn(6, cin)
        want = layer(a * z + b)
        got = F.linear(z, w, bias)
    else:
        z = torch.randn(2, cin, 9, 9)
        want = layer(bn(z))
        fn = F.conv_transpose2d if transposed else F.conv2d
        kwargs = {} if transposed else {"dilation": layer.dilation}
        got = fn(z, w, bias, layer.stride, layer.padding, groups=layer.groups, **kwargs)
    torch.testing.assert_close(got, want)


def test_identity_bn_is_identity_in_eval() -> None:
    mean, var = torch.randn(5), torch.rand(5) + 0.01
    bn = nn.BatchNorm2d(5, eps=1e-4).double().eval()
    w, b = bn_math.identity_bn_params(mean, var, bn.eps)
    with torch.no_grad():
        bn.weight.copy_(w), bn.bias.copy_(b), bn.running_mean.copy_(mean), bn.running_var.copy_(var)
    x = torch.randn(3, 5, 2, 2) * 4
    torch.testing.assert_close(bn(x), x)


@pytest.mark.parametrize(
    "act", [F.relu, F.gelu, F.silu, torch.tanh, F.hardswish, F.softplus, nn.PReLU(4, 0.1).double()]
)
def test_gaussian_moments_against_monte_carlo(act) -> None:  # type: ignore[no-untyped-def]
    mean = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    std = torch.tensor([0.5, 1.0, 2.0, 0.1])
    m, v = bn_math.gaussian_moments(act, mean, std)
    z = mean + std * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0))
    y = act(z).detach()
    torch.testing.assert_close(m, y.mean(0), atol=6e-3, rtol=1e-2)
    torch.testing.assert_close(v, y.var(0), atol=6e-3, rtol=2e-2)


@pytest.mark.parametrize("act", [F.gelu, F.silu, torch.tanh, F.elu])
def test_match_gaussian_inverts_moments(act) -> None:  # type: ignore[no-untyped-def]
    mu = torch.tensor([-0.5, 0.0, 0.3, 1.2])
    sigma = torch.tensor([0.4, 1.0, 0.7, 1.5])
    m, v = bn_math.gaussian_moments(act, mu, sigma)
    got_mu, got_sigma, ok = bn_math.match_gaussian(act, m, v)
    assert bool(ok.all())
    torch.testing.assert_close(got_mu, mu, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got_sigma, sigma, atol=1e-3, rtol=1e-3)


def test_match_gaussian_reports_impossible_targets() -> None:
    # tanh never has a mean above 1: no Gaussian explains it.
    _, _, ok = bn_math.match_gaussian(torch.tanh, torch.tensor([0.0, 1.5]), torch.tensor([0.2, 0.1]))
    assert ok.tolist() == [True, False]

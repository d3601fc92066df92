"""The pure math of bn_math against torch layers and brute force."""

from __future__ import annotations

import functools
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
    a, b, _ = bn_math.bn_affine(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    return a, b


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


def _match_gaussian_reference(f, target_mean, target_var, steps=60, nodes=64):  # type: ignore[no-untyped-def]
    """The solver before the closed-form Jacobian: 60 damped Newton steps, Jacobians from two
    autograd passes per step. The oracle the fast solver must agree with."""
    tm, tv = target_mean.double(), target_var.double().clamp_min(1e-12)
    mu, log_s = tm.clone(), 0.5 * torch.log(tv)
    x, w = bn_math._hermite_nodes(nodes)
    scale_m = tv.sqrt() + 1e-6
    for _ in range(steps):
        mu = mu.detach().requires_grad_(True)
        log_s = log_s.detach().requires_grad_(True)
        y = f(mu[None, :] + torch.exp(log_s)[None, :] * x[:, None])
        m = (w[:, None] * y).sum(0)
        v = (w[:, None] * (y - m) ** 2).sum(0)
        r1 = (m - tm) / scale_m
        r2 = 0.5 * (torch.log(v + 1e-12) - torch.log(tv))
        g1 = torch.autograd.grad(r1.sum(), (mu, log_s), retain_graph=True)
        g2 = torch.autograd.grad(r2.sum(), (mu, log_s))
        det = g1[0] * g2[1] - g1[1] * g2[0]
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        with torch.no_grad():
            mu = mu - torch.clamp(0.7 * (g2[1] * r1 - g1[1] * r2) / det, -2.0 * scale_m, 2.0 * scale_m)
            log_s = log_s - (0.7 * (-g2[0] * r1 + g1[0] * r2) / det).clamp(-1.0, 1.0)
    with torch.no_grad():
        m, v = bn_math.gaussian_moments(f, mu, torch.exp(log_s), nodes=nodes)
    ok = ((m - tm).abs() <= 1e-3 * (tv.sqrt() + 1e-3)) & ((v - tv).abs() <= 1e-2 * tv + 1e-8)
    return mu.detach(), torch.exp(log_s).detach(), ok


_TARGET_ACTIVATIONS = {
    "ReLU": F.relu,
    "ReLU6": F.relu6,
    "LeakyReLU": lambda z: F.leaky_relu(z, 0.1),
    "GELU": F.gelu,
    "SiLU": F.silu,
    "Hardswish": F.hardswish,
    "Tanh": torch.tanh,
}


@pytest.mark.parametrize("name", list(_TARGET_ACTIVATIONS))
def test_match_gaussian_agrees_with_the_autograd_solver(name: str) -> None:
    """Statistics a BN after ``f`` holds (moments of ``f`` of Gaussians, plus targets no Gaussian
    explains): the same solutions to 1e-6 and the same channels reported unsolvable."""
    f = _TARGET_ACTIVATIONS[name]
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(48, generator=g) * 1.5
    sigma = torch.rand(48, generator=g) * 2 + 0.05
    m, v = bn_math.gaussian_moments(f, mu, sigma)
    # a few targets outside what f can produce: means below f's range, variances too large for it
    m[:4] = torch.tensor([-3.0, -2.0, m[2].item(), m[3].item()])
    v[2:4] = torch.tensor([50.0, 80.0])
    fast = bn_math.match_gaussian(f, m, v)
    slow = _match_gaussian_reference(f, m, v)
    assert fast[2].tolist() == slow[2].tolist()
    assert int(fast[2].sum()) >= 40  # the moments of real Gaussians are matched
    ok = slow[2]
    torch.testing.assert_close(fast[0][ok], slow[0][ok], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast[1][ok], slow[1][ok], atol=1e-6, rtol=1e-6)


def test_match_gaussian_stops_channels_that_converged() -> None:
    """Converged channels take no more steps: a solve of easy targets makes far fewer calls of f
    than the step limit."""
    calls = 0

    def counted(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return F.silu(z)

    m, v = bn_math.gaussian_moments(F.silu, torch.tensor([0.2, -0.4, 1.0]), torch.tensor([1.0, 0.5, 2.0]))
    calls = 0
    _, _, ok = bn_math.match_gaussian(counted, m, v, steps=60)
    assert bool(ok.all())
    assert calls < 40


def test_match_gaussian_reports_impossible_targets() -> None:
    # tanh never has a mean above 1: no Gaussian explains it.
    _, _, ok = bn_math.match_gaussian(torch.tanh, torch.tensor([0.0, 1.5]), torch.tensor([0.2, 0.1]))
    assert ok.tolist() == [True, False]


@pytest.mark.parametrize("fold", [bn_math.fold_into_preceding, bn_math.fold_into_following])
def test_a_float32_weight_scaled_in_float32_is_within_two_ulps_of_the_float64_fold(fold) -> None:  # type: ignore[no-untyped-def]
    """A conversion scales a float32 weight in float32: the scale and the product each round, so
    it lies within two units in the last place of the float64 fold rounded once; the bias is
    float64 either way, and the same."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 6, 3, 3, generator=g, dtype=torch.float32)
    bias = torch.randn(6, generator=g, dtype=torch.float32)
    a = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.1
    b = torch.randn(6, generator=g, dtype=torch.float64)
    w64, c64 = fold(weight, bias, a, b)
    w32, c32 = fold(weight, bias, a, b, dtype=torch.float32)
    assert w64.dtype == torch.float64 and w32.dtype == torch.float32 and c32.dtype == torch.float64
    ulp = torch.finfo(torch.float32).eps * w64.abs().float()
    assert bool(((w32 - w64.float()).abs() <= 2 * ulp).all())
    assert not torch.equal(w32, w64.float())  # the roundings differ somewhere: the check can fail
    torch.testing.assert_close(c32, c64, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fold", [bn_math.fold_into_preceding, bn_math.fold_into_following])
@pytest.mark.parametrize(
    ("shape", "groups", "transposed"),
    [((6, 6, 3, 3), 1, False), ((6, 3, 1, 1), 2, False), ((6, 3, 1, 1), 2, True), ((6, 6), 1, False)],
)
def test_a_fold_in_place_scales_the_weight_itself_to_the_same_numbers(
    fold, shape, groups, transposed
) -> None:  # type: ignore[no-untyped-def]
    """``inplace=True`` writes the scaled weight into the weight it was given (no temporary the size
    of it) with the numbers of the fold that copies, bit for bit, 1x1 kernels included; without it
    the weight is left as it was."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(*shape, generator=g, dtype=torch.float32)
    bias = torch.randn(shape[1] * groups if transposed else shape[0], generator=g, dtype=torch.float32)
    channels = (
        (shape[0] if transposed else shape[1] * groups)
        if fold is bn_math.fold_into_following
        else bias.numel()
    )
    a = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(channels, generator=g, dtype=torch.float64)
    kept = weight.clone()
    options = {"groups": groups, "transposed": transposed, "dtype": torch.float32}
    copied = fold(weight, bias, a, b, **options)
    assert torch.equal(weight, kept)
    inplace = fold(weight, bias, a, b, inplace=True, **options)
    assert inplace[0].data_ptr() == weight.data_ptr() and torch.equal(weight, copied[0])
    assert not torch.equal(weight, kept)
    assert torch.equal(inplace[1], copied[1])


def test_solves_in_chunks_of_channels_as_in_one_and_never_split_a_per_channel_activation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An elementwise activation's quadratures take a chunk of channels at a time, in one Newton loop,
    to the same solutions (1e-12); a per-channel one (PReLU) sees every channel at once, as it must."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(40, generator=g, dtype=torch.float64)
    sigma = torch.rand(40, generator=g, dtype=torch.float64) + 0.3
    whole_m, whole_v = bn_math.gaussian_moments(F.silu, mu, sigma)
    whole = bn_math.match_gaussian(F.silu, whole_m, whole_v)
    prelu = nn.PReLU(40).double()
    with torch.no_grad():
        prelu.weight.uniform_(0.1, 0.5)
    widths: list[int] = []

    def per_channel(z: torch.Tensor) -> torch.Tensor:
        widths.append(z.shape[1])
        return prelu(z)

    p_m, p_v = bn_math.gaussian_moments(per_channel, mu, sigma)
    monkeypatch.setattr(bn_math, "_CHUNK", 16)
    chunked_m, chunked_v = bn_math.gaussian_moments(F.silu, mu, sigma)
    torch.testing.assert_close(chunked_m, whole_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_v, whole_v, rtol=1e-12, atol=1e-12)
    loops = []
    newton = bn_math.newton_match
    monkeypatch.setattr(bn_math, "newton_match", lambda *a: loops.append(1) or newton(*a))
    chunked = bn_math.match_gaussian(F.silu, whole_m, whole_v)
    assert len(loops) == 1  # one Newton loop for the 3 chunks: its last steps are paid once
    assert bool(whole[2].all()) and torch.equal(chunked[2], whole[2])
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-10, atol=1e-10)
    widths.clear()
    torch.testing.assert_close(bn_math.gaussian_moments(per_channel, mu, sigma)[0], p_m, rtol=0, atol=0)
    bn_math.match_gaussian(per_channel, p_m, p_v)
    assert 40 in widths and 16 not in widths  # (64 channels: the elementwise probe, which fails)


@pytest.mark.parametrize("solver", ["quadrature", "piecewise"])
def test_repeated_targets_are_solved_once_each_to_the_same_solutions(
    solver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BNs never trained hold the same statistics: 3 distinct targets over 300 channels are solved
    on 3 channels, and each channel gets what solving its target alone gives (1e-12)."""
    from bnmove.core import piecewise

    g = torch.Generator().manual_seed(4)
    mu = torch.randn(3, generator=g, dtype=torch.float64)
    sigma = torch.rand(3, generator=g, dtype=torch.float64) + 0.3
    widths: list[int] = []
    if solver == "quadrature":

        def silu(z: torch.Tensor) -> torch.Tensor:
            widths.append(z.shape[1])
            return F.silu(z)

        m, v = bn_math.gaussian_moments(F.silu, mu, sigma)
        solve = functools.partial(bn_math.match_gaussian, silu)
        probe = {64, 32}  # the elementwise check's own calls
    else:
        m, v = piecewise.moments(piecewise.HARDSWISH, mu, sigma)
        expectations = piecewise._Pieces.expectations

        def counted(
            self: piecewise._Pieces, mu: torch.Tensor, sigma: torch.Tensor, families: int = 6
        ) -> torch.Tensor:
            widths.append(mu.numel())
            return expectations(self, mu, sigma, families)

        monkeypatch.setattr(piecewise._Pieces, "expectations", counted)
        solve = functools.partial(piecewise.match, piecewise.HARDSWISH)
        probe = set()
    alone = [solve(m[i : i + 1], v[i : i + 1]) for i in range(3)]
    order = torch.randint(0, 3, (300,), generator=g)
    widths.clear()
    together = solve(m[order], v[order])
    assert widths and max(w for w in widths if w not in probe) <= 3
    assert bool(together[2].all())
    for k in range(2):  # mu, then sigma
        want = torch.cat([alone[i][k] for i in range(3)])[order]
        torch.testing.assert_close(together[k], want, rtol=1e-12, atol=1e-12)


class _OwnInplace(nn.Module):
    """An activation of the user's own with an ``inplace`` flag it ignores: it always writes."""

    def __init__(self) -> None:
        super().__init__()
        self.inplace = True

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.clamp_(min=0.0)


@pytest.mark.parametrize("make", [lambda: nn.SiLU(inplace=True), lambda: nn.ReLU6(inplace=True), _OwnInplace])
def test_an_activation_module_as_a_function_never_writes_over_its_input(make) -> None:  # type: ignore[no-untyped-def]
    """torch's in-place activations are called as a copy with ``inplace=False`` (the module given
    keeps its flag); any other module on a copy of the input."""
    from bnmove.rules._parameters import module_function

    module = make()
    f = module_function(module)
    z = torch.randn(4, 8, dtype=torch.float64)
    kept = z.clone()
    torch.testing.assert_close(f(z), make()(z.clone()), rtol=0, atol=0)
    assert torch.equal(z, kept) and module.inplace is True

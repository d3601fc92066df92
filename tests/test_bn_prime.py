"""BN′'s statistics: the rectified Gaussian in closed form, and one batched solve per activation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from zoo import randomize_bn

from bnmove import convert
from bnmove.core import bn_math, piecewise, rectified


def _integrated(mu: float, sigma: float) -> tuple[float, float]:
    """Mean and variance of relu(N(mu, sigma²)) by the trapezoid rule on a fine grid."""
    z = torch.linspace(min(mu - 12 * sigma, -1e-9), mu + 12 * sigma, 4_000_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((z - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    y = torch.relu(z)
    mean = torch.trapezoid(y * density, z)
    return float(mean), float(torch.trapezoid((y - mean) ** 2 * density, z))


@pytest.mark.parametrize(("mu", "sigma"), [(-3.0, 1.0), (-0.7, 0.3), (0.0, 2.0), (0.4, 1.5), (5.0, 0.5)])
def test_relu_moments_are_the_integrals(mu: float, sigma: float) -> None:
    m, v = rectified.relu_moments(
        torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
    )
    want_m, want_v = _integrated(mu, sigma)
    assert m.item() == pytest.approx(want_m, rel=1e-9, abs=1e-12)
    assert v.item() == pytest.approx(want_v, rel=1e-8, abs=1e-12)


def test_quadrature_misses_what_the_closed_form_gets() -> None:
    """Why ReLU has its own closed form: Gauss–Hermite quadrature is off at the kink's tail."""
    mu, sigma = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([0.4], dtype=torch.float64)
    want_v = _integrated(-2.0, 0.4)[1]
    _, quadrature = bn_math.gaussian_moments(F.relu, mu, sigma)
    _, closed = rectified.relu_moments(mu, sigma)
    assert abs(quadrature.item() / want_v - 1) > 1e-2
    assert abs(closed.item() / want_v - 1) < 1e-8


def test_match_relu_inverts_the_moments_from_far_tail_to_identity() -> None:
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(20000, generator=g, dtype=torch.float64) * 28 - 20  # -20 .. 8
    sigma = torch.rand(20000, generator=g, dtype=torch.float64) * 3 + 1e-3
    m, v = rectified.relu_moments(alpha * sigma, sigma)
    mu, s, solved = rectified.match_relu(m, v)
    assert bool(solved.all())
    assert float(((mu - alpha * sigma) / sigma).abs().max()) < 1e-8
    assert float((s / sigma - 1).abs().max()) < 1e-9


def test_match_relu_reports_what_no_gaussian_explains() -> None:
    mu, sigma, solved = rectified.match_relu(
        torch.tensor([-1.0, 0.0, 1.0, 1.0, 100.0]), torch.tensor([1.0, 1.0, 0.0, 1.0, 4.0])
    )
    assert solved.tolist() == [False, False, False, True, True]
    assert mu[:3].tolist() == [0.0, 0.0, 0.0] and sigma[:3].tolist() == [1.0, 1.0, 1.0]
    assert mu[4].item() == 100.0 and sigma[4].item() == 2.0  # far above 0, ReLU passes N through


def _blocks() -> nn.Module:
    """conv → BN → act blocks: three ReLU (one functional), two SiLU, one PReLU (per channel)."""

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(6))
            self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(6))
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(inplace=True), nn.SiLU(), nn.SiLU(), nn.PReLU(4)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
                x = F.relu(bn(conv(x))) if i == 5 else self.acts[i](bn(conv(x)))
            return x

    torch.manual_seed(0)
    model = randomize_bn(Blocks()).eval()
    with torch.no_grad():
        model.acts[4].weight.uniform_(0.1, 0.3)
    return model


def _solo(f: bn_math.Activation, relu: bool, after: bool, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The statistics BN′ takes when its BN is solved alone: ``(mean, var)`` stacked."""
    if after:
        m, v = rectified.relu_moments(a, b) if relu else bn_math.gaussian_moments(f, a, b)
        return torch.stack([m, v])
    mu, sigma, ok = rectified.match_relu(a, b) if relu else bn_math.match_gaussian(f, a, b)
    assert bool(ok.all())
    return torch.stack([mu, sigma**2])


def test_solved_together_as_each_alone_and_once_per_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = _blocks(), torch.randn(2, 4, 5, 5)
    calls = {"gaussian_moments": 0, "match_gaussian": 0}
    for name in calls:
        original = getattr(bn_math, name)

        def counted(*args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(bn_math, name, counted)
    there = convert(model, "after", method="exact", example_inputs=(x,))
    # SiLU's two BNs in one quadrature, PReLU's alone; ReLU's three in closed form
    assert calls == {"gaussian_moments": 2, "match_gaussian": 0}
    back = convert(there.model, "before", method="exact", example_inputs=(x,))
    assert calls["match_gaussian"] == 2
    moved = {m.pair.bn: m.moved_to for m in there.moves}
    returned = {m.pair.bn: m.moved_to for m in back.moves}
    functions = [F.relu, F.relu, F.silu, F.silu, model.acts[4].double(), F.relu]
    for i, f in enumerate(functions):
        relu = f is F.relu
        bn = model.bns[i]
        prime = there.model.get_submodule(str(moved[f"bns.{i}"]))
        want = _solo(f, relu, True, bn.bias.detach().double(), bn.weight.detach().double())
        got = torch.stack([prime.running_mean, prime.running_var]).double()
        torch.testing.assert_close(got, want.float().double(), rtol=0, atol=0)
        again = back.model.get_submodule(str(returned[str(moved[f"bns.{i}"])]))
        want = _solo(f, relu, False, prime.running_mean.double(), prime.running_var.double())
        got = torch.stack([again.running_mean, again.running_var]).double()
        torch.testing.assert_close(got, want.float().double(), rtol=0, atol=0)


def test_statistics_solved_from_other_values_are_solved_again() -> None:
    """A BN changed after its BN′ was solved (here by hand) is solved again, alone, from what it
    holds when the move is made."""
    from bnmove.pipeline.analyse import analyse
    from bnmove.rules import FOLD_BACKWARD, solve_primes
    from bnmove.rules._exact import identity

    model = _blocks()
    analysis = analyse(model, (torch.randn(2, 4, 5, 5),))
    site = next(s for s in analysis.sites if s.pair.bn == "bns.0")
    root = analysis.traced.regions[site.region].root
    prime = solve_primes([(root, site, FOLD_BACKWARD)])[site]
    bn = root.get_submodule("bns.0")
    with torch.no_grad():
        bn.bias.add_(1.0)
    want = rectified.relu_moments(bn.bias.detach().double(), bn.weight.detach().double())
    identity(root, site, bn, prime)
    torch.testing.assert_close(bn.running_mean.double(), want[0].float().double(), rtol=0, atol=0)
    assert not torch.equal(bn.running_mean, prime.mean.float())


_PIECEWISE_CASES = {
    "ReLU6": (F.relu6, piecewise.clipped(0.0, 6.0)),
    "Hardtanh(-2, 3)": (lambda z: F.hardtanh(z, -2.0, 3.0), piecewise.clipped(-2.0, 3.0)),
    "LeakyReLU(0.2)": (lambda z: F.leaky_relu(z, 0.2), piecewise.leaky(0.2)),
    "Hardswish": (F.hardswish, piecewise.HARDSWISH),
    "Hardsigmoid": (F.hardsigmoid, piecewise.HARDSIGMOID),
}


def _integrated_f(f, mu: float, sigma: float) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    z = torch.linspace(mu - 12 * sigma, mu + 12 * sigma, 4_000_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((z - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    y = f(z)
    mean = torch.trapezoid(y * density, z)
    return float(mean), float(torch.trapezoid((y - mean) ** 2 * density, z))


@pytest.mark.parametrize("name", list(_PIECEWISE_CASES))
def test_piecewise_moments_are_the_integrals_and_their_inverse_hits_them(name: str) -> None:
    f, pieces = _PIECEWISE_CASES[name]
    for mu, sigma in [(-3.0, 1.0), (0.2, 0.5), (2.0, 3.0), (5.5, 0.3), (-1.4, 0.4)]:
        m, v = piecewise.moments(
            pieces, torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma], dtype=torch.float64)
        )
        want_m, want_v = _integrated_f(f, mu, sigma)
        assert m.item() == pytest.approx(want_m, rel=1e-8, abs=1e-10)
        assert v.item() == pytest.approx(want_v, rel=1e-7, abs=1e-10)
    g = torch.Generator().manual_seed(0)
    mu_c = torch.randn(500, generator=g, dtype=torch.float64) * 1.5
    sigma_c = torch.rand(500, generator=g, dtype=torch.float64) * 1.5 + 0.2
    m, v = piecewise.moments(pieces, mu_c, sigma_c)
    got_mu, got_sigma, solved = piecewise.match(pieces, m, v)
    quadrature = bn_math.match_gaussian(f, m, v)
    assert int(solved.sum()) >= int(quadrature[2].sum()) - 2  # as many channels as quadrature solves
    again_m, again_v = piecewise.moments(pieces, got_mu[solved], got_sigma[solved])
    # the moments hit (quadrature's own solutions miss them by up to 1e-2: it is exact for
    # polynomials, not at the kinks)
    assert float(((again_m - m[solved]).abs() / (v[solved].sqrt() + 1e-3)).median()) < 1e-9
    assert float(((again_v - v[solved]).abs() / (v[solved] + 1e-8)).median()) < 1e-9


def test_the_conversion_solves_piecewise_activations_in_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hardswish and ReLU6 BN′s, each way: no quadrature, and the statistics are their closed forms."""
    calls: list[str] = []
    for name in ("gaussian_moments", "match_gaussian"):
        original = getattr(bn_math, name)

        def counted(*args, _name=name, _original=original, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(bn_math, name, counted)
    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Hardswish(),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
            nn.ReLU6(),
        )
    ).eval()
    x = torch.randn(2, 3, 5, 5)
    there = convert(model, "after", method="exact", example_inputs=(x,))
    back = convert(there.model, "before", method="exact", example_inputs=(x,))
    assert calls == []
    for index, pieces in ((1, piecewise.HARDSWISH), (4, piecewise.clipped(0.0, 6.0))):
        bn = model[index]
        (move,) = [m for m in there.moves if m.pair.bn == str(index)]
        prime = there.model.get_submodule(str(move.moved_to))
        want = piecewise.moments(pieces, bn.bias.detach().double(), bn.weight.detach().double())
        torch.testing.assert_close(prime.running_mean.double(), want[0].float().double(), rtol=0, atol=0)
        torch.testing.assert_close(prime.running_var.double(), want[1].float().double(), rtol=0, atol=0)
    assert sum(m.moved for m in back.moves) == 2

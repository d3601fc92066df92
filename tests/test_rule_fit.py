"""The fit rules: ``BN → f`` to ``f → BN′`` by least squares, ``f → BN`` to ``BN′ → f`` by
Levenberg–Marquardt; where no fit is possible the plan swaps and says why."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from rules_helpers import rules_used
from torch import nn
from zoo import build, randomize_bn

from bnmove import convert
from bnmove.core import fit_math
from bnmove.core.affine import affine_map
from bnmove.pipeline.analyse import analyse
from bnmove.pipeline.plan import plan
from bnmove.rules import FIT, SWAP, Check, pair_activation


def _mlp(activation: type[nn.Module]) -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), activation(),   # before
        nn.Linear(16, 16), activation(), nn.BatchNorm1d(16),  # after
        nn.Linear(16, 3),
    )  # fmt: skip
    model = randomize_bn(model).eval()
    return model, (torch.randn(256, 6),)


def _swap_error(site_placement: str, a: torch.Tensor, b: torch.Tensor, f: Any, samples: Any) -> float:
    """The block error of a swap (BN′ keeps the BN's map) on the fit's own samples."""
    z, w, target = samples
    with torch.no_grad():
        if site_placement == "before":  # f → BN with the old map, against f(a z + b)
            swapped = a[None, :] * f(z.clone()).double() + b[None, :]
        else:  # BN with the old map → f, against a f(z) + b
            swapped = f(a[None, :] * z + b[None, :]).double()
    return fit_math.relative_rmse(swapped, target, w)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.SiLU, nn.ReLU])
@pytest.mark.parametrize(("placement", "rule"), [("after", "fit-after"), ("before", "fit-before")])
def test_the_fit_is_no_worse_than_a_swap_on_its_samples(
    activation: type[nn.Module], placement: str, rule: str
) -> None:
    """A swap's parameters are one candidate of the fit (the start of Levenberg–Marquardt, a point of
    the least-squares problem), so the fitted block is never further from the old one."""
    model, inputs = _mlp(activation)
    analysis = analyse(model, inputs)
    (site,) = [s for s in analysis.sites if s.pair.placement not in (None, placement)]
    fit = FIT[site.pair.placement]
    assert fit.name == rule and fit.match(site) and fit.check(site, analysis.contexts[""]).ok
    bn = model.get_submodule(site.pair.bn)
    f = pair_activation(model, site)
    samples = fit.samples(bn, f)
    swap = _swap_error(site.pair.placement, *affine_map(bn), f, samples)
    work = copy.deepcopy(model)
    applied = fit.apply(work, site, Check())
    assert applied.error is not None and applied.error <= swap + 1e-9, (applied.error, swap)
    # convert applies the same rule, once, with the same figure
    result = convert(model, placement, method="fit", example_inputs=inputs)
    assert rules_used(result) == {rule: 1}
    assert result.moved[0].effect == pytest.approx(applied.error, rel=1e-9)
    moved = result.model.get_submodule(result.moved[0].moved_to or "")
    assert torch.equal(moved.weight, work.get_submodule(site.pair.bn).weight)


def test_no_module_to_hold_the_fit_becomes_a_swap_that_says_why() -> None:
    model, inputs = build("functional-bn")
    analysis = analyse(model, inputs)
    (site,) = [s for s in analysis.sites if s.pair.placement]
    checked = FIT[site.pair.placement].check(site, analysis.contexts[site.region])
    assert checked.reason == "functional batch_norm has no module to hold the fitted parameters"
    (decision,) = [d for d in plan(analysis, "after", "fit") if d.rule is not None]
    assert decision.rule is SWAP and decision.note == f"swapped instead of fitted: {checked.reason}"
    result = convert(model, "after", method="fit", example_inputs=inputs)
    assert rules_used(result) == {"swap": 1}
    assert f"swapped instead of fitted: {checked.reason}" in result.moved[0].notes

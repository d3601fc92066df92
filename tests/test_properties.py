"""Property-based tests over random models built from a small grammar.

Blocks (all on C channels): ``before`` conv -> BN -> f; ``after`` conv -> f -> BN;
``res_before`` / ``res_after`` the same inside ``x + block(x)``; ``lone``
``g(x + BN(conv(x)))`` (a BN with no adjacent activation); ``concat``
``conv1x1(cat[f(BN(conv x)), BN(f(conv x))])``. Activations come as modules
(own or one stateless module shared by many blocks), ``F.*`` functions or tensor
methods. The generator knows which pairs it planted.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from conftest import assert_same_outputs, renamed_key
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from zoo import randomize_bn

import bnmove
from bnmove.analysis.tracing import trace_regions

C = 4
ACTS: dict[str, tuple[type[nn.Module], object, str | None]] = {
    "relu": (nn.ReLU, F.relu, "relu"),
    "gelu": (nn.GELU, F.gelu, None),
    "silu": (nn.SiLU, F.silu, None),
    "tanh": (nn.Tanh, torch.tanh, "tanh"),
    "hardswish": (nn.Hardswish, F.hardswish, None),
    "sigmoid": (nn.Sigmoid, torch.sigmoid, "sigmoid"),
}
PLANTED = {
    "before": Counter(before=1),
    "after": Counter(after=1),
    "res_before": Counter(before=1),
    "res_after": Counter(after=1),
    "lone": Counter(lone=1),
    "concat": Counter(before=1, after=1),
}


@dataclass(frozen=True)
class Spec:
    kind: str
    act: str
    form: str  # "module", "shared", "function", "method"
    kernel: int  # 1 (unpadded) or 3 (padded)


class Act(nn.Module):
    """Applies one activation in the spec's form (a module call, a function, or a method)."""

    def __init__(self, spec: Spec, shared: nn.Module) -> None:
        super().__init__()
        module_cls, function, method = ACTS[spec.act]
        self.form = spec.form if spec.form != "method" or method else "function"
        self.function, self.method = function, method
        if self.form == "module":
            self.module = module_cls()
        elif self.form == "shared":
            self.module = shared


def apply(act: Act, x: torch.Tensor) -> torch.Tensor:
    if act.form in ("module", "shared"):
        return act.module(x)
    if act.form == "method":
        return getattr(x, str(act.method))()
    return act.function(x)  # type: ignore[operator, no-any-return]


class Block(nn.Module):
    def __init__(self, spec: Spec, shared: nn.Module) -> None:
        super().__init__()
        self.kind = spec.kind
        pad = spec.kernel // 2
        self.conv = nn.Conv2d(C, C, spec.kernel, padding=pad)
        self.bn = nn.BatchNorm2d(C)
        self.f = Act(spec, shared)
        if spec.kind == "concat":
            self.conv2 = nn.Conv2d(C, C, spec.kernel, padding=pad)
            self.bn2 = nn.BatchNorm2d(C)
            self.merge = nn.Conv2d(2 * C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "before":
            return apply(self.f, self.bn(self.conv(x)))
        if k == "after":
            return self.bn(apply(self.f, self.conv(x)))
        if k == "res_before":
            return x + apply(self.f, self.bn(self.conv(x)))
        if k == "res_after":
            return x + self.bn(apply(self.f, self.conv(x)))
        if k == "lone":
            return torch.tanh(x + self.bn(self.conv(x)))
        a = apply(self.f, self.bn(self.conv(x)))
        b = self.bn2(apply(self.f, self.conv2(x)))
        return self.merge(torch.cat([a, b], 1))


class Generated(nn.Module):
    def __init__(self, specs: list[Spec]) -> None:
        super().__init__()
        shared = nn.ReLU()
        self.blocks = nn.ModuleList(Block(s, shared) for s in specs)
        self.head = nn.Conv2d(C, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


specs = st.lists(
    st.builds(
        Spec,
        kind=st.sampled_from(sorted(PLANTED)),
        act=st.sampled_from(sorted(ACTS)),
        form=st.sampled_from(["module", "shared", "function", "method"]),
        kernel=st.sampled_from([1, 3]),
    ),
    min_size=1,
    max_size=5,
)


def _model(blocks: list[Spec], seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    model = randomize_bn(Generated(blocks), seed).eval()
    x = torch.randn(2, C, 5, 5, generator=torch.Generator().manual_seed(seed))
    return model, (x,)


def _placements(model: nn.Module) -> list[tuple[str, str | None]]:
    return sorted((p.bn, p.placement) for p in bnmove.find_pairs(model))


@given(specs, st.integers(0, 2**16))
def test_detection_finds_exactly_the_planted_pairs(blocks: list[Spec], seed: int) -> None:
    model, _ = _model(blocks, seed)
    planted = sum((PLANTED[s.kind] for s in blocks), Counter())
    found = Counter(p.placement or "lone" for p in bnmove.find_pairs(model))
    assert found == planted
    assert all(p.movable for p in bnmove.find_pairs(model) if p.placement)


@given(specs, st.integers(0, 2**16), st.sampled_from(["before", "after"]))
def test_exact_preserves_outputs_and_swap_preserves_parameters(
    blocks: list[Spec], seed: int, placement: str
) -> None:
    model, inputs = _model(blocks, seed)
    exact = bnmove.convert(model, placement, method="exact", example_inputs=inputs)
    assert_same_outputs(model, exact.model, inputs)
    swap = bnmove.convert(model, placement, method="swap", example_inputs=inputs)
    old = {renamed_key(swap, k): v for k, v in model.state_dict().items()}
    new = swap.model.state_dict()
    assert set(old) == set(new) and all(torch.equal(old[k], new[k]) for k in old)
    other = "after" if placement == "before" else "before"
    assert len(swap.moved) == sum(1 for p in bnmove.find_pairs(model) if p.placement == other)


@given(specs, st.integers(0, 2**16))
def test_current_placement_is_a_no_op_and_round_trips_restore(blocks: list[Spec], seed: int) -> None:
    model, inputs = _model(blocks, seed)
    after = bnmove.convert(model, "after", example_inputs=inputs).model
    assert {p for _, p in _placements(after)} <= {"after", None}
    again = bnmove.convert(after, "after", example_inputs=inputs)
    assert not again.moved and again.verification is not None and again.verification.max_abs_error == 0.0
    before = bnmove.convert(after, "before", example_inputs=inputs).model
    restored = bnmove.convert(before, "after", example_inputs=inputs).model
    # A BN that moved now lives in a Sequential in its old slot, so names may differ; placements do not.
    assert sorted(p or "" for _, p in _placements(restored)) == sorted(p or "" for _, p in _placements(after))


@settings(max_examples=5)
@given(specs, st.integers(0, 2**16), st.sampled_from(["before", "after"]))
def test_converted_models_trace_run_and_export(blocks: list[Spec], seed: int, placement: str) -> None:
    model, inputs = _model(blocks, seed)
    converted = bnmove.convert(model, placement, example_inputs=inputs).model
    assert not trace_regions(converted).untraced
    out = converted.train()(torch.cat([inputs[0]] * 2))
    out.sum().backward()
    with tempfile.TemporaryDirectory() as tmp:
        paths = bnmove.export_variants(converted.eval(), inputs, tmp, ["original"])
        assert paths["original"].stat().st_size > 0

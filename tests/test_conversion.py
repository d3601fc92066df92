from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_outputs, outputs_of, renamed_key
from torch import nn
from zoo import ZOO, FusedNet, InplaceSecondUser, TinyResNet, build, randomize_bn

import bnmove
from bnmove import convert, find_pairs

PLACEMENTS = ("before", "after")
METHODS = ("exact", "swap", "auto")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_conversion(name: str, placement: str, method: str) -> None:
    model, inputs = build(name)
    original_state = _state(model)
    pairs = find_pairs(model)
    result = convert(model, placement, method=method, example_inputs=inputs)

    # The input model is untouched.
    assert all(torch.equal(original_state[k], v) for k, v in model.state_dict().items())

    other = "after" if placement == "before" else "before"
    candidates = [p for p in pairs if p.placement == other and p.movable]
    expected_moved = [p for p in candidates if p.exact] if method == "exact" else candidates
    assert sorted(m.pair.bn for m in result.moved) == sorted(p.bn for p in expected_moved)
    # What inspect promised is what convert did: an unmovable pair stays, for the reason inspect gave.
    assert [m.pair for m in result.moves] == pairs
    for m in result.moves:
        if m.pair.placement == other and not m.pair.movable:
            assert not m.moved and m.reason == m.pair.reason
    for m in result.moved:
        if method == "swap" or "functional" in (m.pair.reason or ""):  # functional BN: nothing to fit
            assert m.method == "swap"
        elif m.pair.exact:
            assert m.method == ("exact-kept-affine" if m.pair.keeps_affine else "exact")
        else:
            assert m.method == "fit-data-free"

    # Every moved pair now sits at the target placement.
    now = {p.bn: p for p in find_pairs(result.model) if p.placement}
    for move in result.moved:
        assert move.moved_to is not None and now[move.moved_to].placement == placement
    # The converted model is the user's model: same class, every module's forward its own.
    assert type(result.model) is type(model)

    assert result.verification is not None
    if all(m.keeps_outputs for m in result.moves):
        assert_same_outputs(model, result.model, inputs)
        assert result.verification.within_tolerance
    if method == "swap":
        converted = result.model.state_dict()
        renamed = {renamed_key(result, k): v for k, v in original_state.items()}
        assert set(converted) == set(renamed)
        assert all(torch.equal(renamed[k], converted[k]) for k in renamed)
    # The model still runs in train mode and backpropagates.
    out = result.model.train()(*[torch.cat([x, x]) for x in inputs])
    out.sum().backward()


@pytest.mark.parametrize("name", list(ZOO))
def test_round_trip_restores_placements(name: str) -> None:
    model, inputs = build(name)
    there = convert(model, "after", example_inputs=inputs).model
    back = convert(there, "before", example_inputs=inputs).model
    again = convert(back, "after", example_inputs=inputs).model
    placements = lambda m: sorted((p.activation_kind or "", p.placement or "") for p in find_pairs(m))  # noqa: E731
    assert placements(again) == placements(there)
    # Names settle after the first move: a BN moved inside the Sequential it now lives in keeps its name.
    back_again = convert(again, "before", example_inputs=inputs).model
    assert sorted(p.bn for p in find_pairs(back_again)) == sorted(p.bn for p in find_pairs(back))


@pytest.mark.parametrize("name", ["resnet", "mlp", "nested", "fused"])
def test_exact_round_trip_keeps_outputs(name: str) -> None:
    model, inputs = build(name)
    there = convert(model, "after", method="exact", example_inputs=inputs).model
    back = convert(there, "before", method="exact", example_inputs=inputs).model
    assert_same_outputs(model, back, inputs)


def test_converting_to_current_placement_is_a_no_op() -> None:
    model, inputs = build("resnet")
    result = convert(model, "before", example_inputs=inputs)
    assert not result.moved
    assert result.verification is not None and result.verification.max_abs_error == 0.0
    assert type(result.model) is TinyResNet and result.model is not model
    state = result.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_state_dict_keys_of_untouched_layers_stay() -> None:
    model, inputs = build("resnet")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    new = result.model.state_dict()
    old = model.state_dict()
    # Folding may add a bias to a bias-free conv; a moved BN's keys gain the index of its
    # place in the Sequential that took its slot (``bn1.weight`` -> ``bn1.1.weight``).
    renamed = {}
    for move in result.moved:
        assert move.moved_to is not None
        for key in old:
            if key.startswith(move.pair.bn + "."):
                renamed[key] = move.moved_to + key[len(move.pair.bn) :]
    assert renamed and all(k.startswith("bn1.") or ".bn1." in k for k in renamed)
    expected = {renamed.get(k, k) for k in old}
    assert expected <= set(new)
    assert set(new) - expected <= {f"{p.neighbour}.bias" for p in find_pairs(model) if p.neighbour}
    for key in ("layer1.0.conv2.weight", "layer1.0.bn2.running_var", "fc.weight"):
        assert torch.equal(old[key], new[key])


def test_fused_module_split_keeps_keys_and_outputs() -> None:
    model, inputs = build("fused")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    # The fused slot became Sequential(act, BN'): its BN keys gain ".1".
    renamed = {k.replace("bn1.", "bn1.1.", 1) for k in model.state_dict() if k.startswith("bn1.")}
    assert renamed <= set(result.model.state_dict())
    pairs = find_pairs(result.model)
    assert [(p.bn, p.activation, p.placement, p.fused) for p in pairs] == [("bn1.1", "bn1.0", "after", False)]
    assert isinstance(result.model.bn1, nn.Sequential)
    assert_same_outputs(model, result.model, inputs)


def test_untraceable_top_level_converts_inside_children() -> None:
    model, inputs = build("untraceable-top")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert result.untraced == []  # recorded from a forward pass instead of traced
    assert len(result.moved) == 2
    assert type(result.model).__name__ == "CheckedNet"  # the untraceable forward is kept as written
    assert_same_outputs(model, result.model, inputs)
    with pytest.raises(ValueError, match="expected 3 channels"):
        result.model(torch.randn(1, 4, 8, 8))


def test_inplace_activation_never_overwrites_a_shared_tensor() -> None:
    class PreAct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU(inplace=True)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            return y + self.conv(self.act(self.bn(y)))  # y is read by the add too

    model = randomize_bn(PreAct()).eval()
    x = torch.randn(2, 4, 5, 5)
    result = convert(model, "after", method="swap", example_inputs=(x,))
    assert result.moved[0].notes and "out-of-place" in result.moved[0].notes[0]
    y = x * 2
    want = y + model.conv(model.bn(torch.relu(y)))
    torch.testing.assert_close(outputs_of(result.model, (x,)), want)


def test_inplace_second_user_stays() -> None:
    model = randomize_bn(InplaceSecondUser()).eval()
    x = torch.randn(2, 3, 6, 6)
    result = convert(model, "before", example_inputs=(x,))
    assert not result.moved
    assert "in-place" in (result.moves[0].reason or "")


def test_modes_device_and_dtype_are_kept() -> None:
    model, inputs = build("resnet")
    model.train()
    model.layer1[0].bn1.eval()  # a user-frozen BN keeps its own flag
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert result.model.training
    assert not result.model.get_submodule("layer1.0.bn1").training
    assert result.model.get_submodule("layer2.0.bn1").training
    assert model.training and not model.layer1[0].bn1.training  # flags of the input restored

    double = copy.deepcopy(model).double().eval()
    converted = convert(double, "after", method="exact", example_inputs=(inputs[0].double(),)).model
    assert {p.dtype for p in converted.parameters()} == {torch.float64}
    assert {b.dtype for n, b in converted.named_buffers() if "num_batches" not in n} == {torch.float64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exact(dtype: torch.dtype) -> None:
    model, inputs = build("mlp")
    half = copy.deepcopy(model).to(dtype)
    result = convert(half, "after", method="exact", example_inputs=(inputs[0].to(dtype),))
    assert {p.dtype for p in result.model.parameters()} == {dtype}
    assert result.verification is not None and result.verification.within_tolerance


def test_exact_new_bn_statistics_match_train_mode() -> None:
    # Train-mode outputs start close because BN' holds the real statistics of f(BN(x)).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(64, 3, 8, 8) * 2 + 0.5
    model.train()
    with torch.no_grad():
        for _ in range(20):  # let running stats converge to this data
            model[1].momentum = None
            model(x)
    model.eval()
    result = convert(model, "after", method="exact", example_inputs=(x,))
    new_bn = result.model.get_submodule("1")
    act_out = torch.nn.functional.gelu(result.model.get_submodule("0")(x))
    torch.testing.assert_close(new_bn.running_mean, act_out.mean((0, 2, 3)), atol=0.05, rtol=0.1)
    torch.testing.assert_close(new_bn.running_var, act_out.var((0, 2, 3)), atol=0.05, rtol=0.15)


def test_verification_failure_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from bnmove.core import bn_math

    original = bn_math.fold_into_preceding

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        weight, bias = original(*args, **kwargs)
        return weight * 1.01, bias

    monkeypatch.setattr(bn_math, "fold_into_preceding", broken)
    model, inputs = build("mlp")
    with pytest.raises(bnmove.VerificationError, match="exact conversion changed outputs"):
        convert(model, "after", method="exact", example_inputs=inputs)


def test_bad_arguments() -> None:
    model, _ = build("mlp")
    with pytest.raises(bnmove.BnmoveError, match="unknown placement 'middle'"):
        convert(model, "middle")
    with pytest.raises(bnmove.BnmoveError, match="unknown method"):
        convert(model, "after", method="magic")


def test_inferred_inputs() -> None:
    model = FusedNet().eval()
    result = convert(model, "after")
    assert result.verification is not None
    assert result.verification.input_shapes == [[1, 3, 224, 224]]
    with pytest.raises(bnmove.BnmoveError, match="--input-shape"):
        convert(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3)), "after")


class DropSlot(nn.Module):
    """timm's ResNet block: BN -> Identity (drop-block slot) -> act, and act -> Identity -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act2 = nn.SiLU()
        self.aa = nn.Identity()
        self.bn2 = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        return self.proj(self.bn2(self.aa(self.act2(self.conv2(x)))))


@pytest.mark.parametrize("method", ["exact", "swap"])
def test_pairs_through_identity_links(method: str) -> None:
    model = randomize_bn(DropSlot()).eval()
    x = torch.randn(2, 3, 6, 6)
    pairs = find_pairs(model)
    assert [(p.bn, p.activation, p.placement, p.exact) for p in pairs] == [
        ("bn1", "act1", "before", True),
        ("bn2", "act2", "after", True),
    ]
    after = convert(model, "after", method=method, example_inputs=(x,))
    before = convert(model, "before", method=method, example_inputs=(x,))
    assert [p.placement for p in find_pairs(after.model)] == ["after", "after"]
    assert [p.placement for p in find_pairs(before.model)] == ["before", "before"]
    if method == "exact":
        assert_same_outputs(model, after.model, (x,))
        assert_same_outputs(model, before.model, (x,))
    else:
        with torch.no_grad():
            h = model.act1(model.conv1(x))  # swap: act1 now sees the conv output directly
            h = model.bn1(h)
            want = model.proj(model.bn2(model.act2(model.conv2(h))))
        torch.testing.assert_close(outputs_of(after.model, (x,)), want)


def test_inplace_through_identity_alias_is_made_out_of_place() -> None:
    class Alias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.skip = nn.Identity()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + 1
            return self.act(self.skip(self.bn(y))) + y

    model = randomize_bn(Alias()).eval()
    x = torch.randn(2, 3, 4, 4)
    result = convert(model, "after", method="swap", example_inputs=(x,))
    y = x + 1
    torch.testing.assert_close(outputs_of(result.model, (x,)), model.bn(torch.relu(y)) + y)


class _DenseLayer(nn.Module):
    """concat -> BN -> ReLU -> 1x1 conv: the BN is a module outside any Sequential."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, growth, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))


class _DenseNet(nn.Module):
    """Layers held in attributes (``layer0``, ``layer1``, …), each reading every earlier output."""

    def __init__(self, layers: int, growth: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, growth, 3, padding=1)
        self.layers = layers
        for i in range(layers):
            setattr(self, f"layer{i}", _DenseLayer(growth * (i + 1), growth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for i in range(self.layers):
            features.append(getattr(self, f"layer{i}")(features))
        return torch.cat(features, 1).mean((2, 3))


def _module_walks(layers: int) -> float:
    """How many walks of the whole module tree converting a ``layers``-layer DenseNet to after
    costs: every module ``named_modules`` yields, over the model's size."""
    model = randomize_bn(_DenseNet(layers)).eval()
    size = len(list(model.modules()))
    visited = 0
    original = nn.Module.named_modules

    def counted(self: nn.Module, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        nonlocal visited
        for item in original(self, *args, **kwargs):  # type: ignore[arg-type]
            visited += 1
            yield item

    nn.Module.named_modules = counted  # type: ignore[method-assign]
    try:
        result = convert(model, "after", method="exact", example_inputs=(torch.randn(1, 3, 4, 4),))
    finally:
        nn.Module.named_modules = original  # type: ignore[method-assign]
    assert sum(m.moved for m in result.moves) == layers
    return visited / size


def test_a_conversion_walks_the_module_tree_a_bounded_number_of_times() -> None:
    """Four times the pairs, the same number of walks of the tree (not four times as many, as one
    walk per replaced module made it)."""
    few, many = _module_walks(6), _module_walks(24)
    assert many <= few + 2, (few, many)

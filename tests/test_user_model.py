"""The converted model is the user's model: one hand-written model per pattern real libraries use.

Each model reproduces in a few lines what made third-party models fail: code
torch.fx cannot trace, caches, properties, hooks, library activation classes,
fused modules with their activation off, list inputs and dict outputs, deep
nets that amplify float32 rounding.
"""

from __future__ import annotations

import io
import math
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_outputs
from torch import nn

import bnmove
from bnmove import convert, find_pairs


def _same(model: nn.Module, converted: nn.Module, *inputs: object) -> None:
    assert_same_outputs(model, converted, inputs)


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


class ConvBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, act: nn.Module | None = None, k: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act if act is not None else nn.ReLU()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TF-style "same" padding computed from the input's shape: torch.fx cannot trace this.
        pad = max((math.ceil(x.shape[-1] / 1) - 1) + self.k - x.shape[-1], 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        return self.act(self.bn(self.conv(x)))


class SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = ConvBnAct(3, 8)
        self.b = ConvBnAct(8, 8, nn.SiLU())
        self.head = nn.Linear(8, 4)

    @property
    def width(self) -> int:  # a property the forward reads
        return self.head.in_features

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.b(self.a(x))
        if mask is not None:  # an optional argument tested in forward
            x = x * mask
        return self.head(x.mean((2, 3)).reshape(-1, self.width))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_untraceable_padding_and_optional_argument_convert_as_modules() -> None:
    model = _randomize(SamePadNet())
    x = torch.randn(2, 3, 9, 9)
    pairs = find_pairs(model, (x,))
    assert sorted((p.bn, p.placement, p.exact) for p in pairs) == [
        ("a.bn", "before", True),
        ("b.bn", "before", True),
    ]
    result = convert(model, "after", method="exact", example_inputs=(x,))
    out = result.model
    assert type(out) is SamePadNet and out.width == 8
    assert len(result.moved) == 2 and "forward" not in vars(out) and "forward" not in vars(out.a)
    assert isinstance(out.a.bn, nn.Sequential) and isinstance(out.a.act, nn.Identity)
    # The user's forward (and its other methods) still decide shapes: other sizes, the mask.
    for size in (9, 12):
        y = torch.randn(2, 3, size, size)
        _same(model, out, y)
        mask = torch.rand(1, 8, size, size)
        _same(model, out, y, mask)
    torch.testing.assert_close(model.forward_features(x), out.forward_features(x), atol=1e-5, rtol=1e-4)
    assert sorted((p.bn, p.placement) for p in find_pairs(out, (x,))) == [
        ("a.bn.1", "after"),
        ("b.bn.1", "after"),
    ]


class SplitNet(nn.Module):
    """A loop over ``torch.split`` outputs (mixed-kernel convs): fx cannot iterate a Proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(2, 2, 1) for _ in range(2))
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardswish()
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [conv(chunk) for conv, chunk in zip(self.convs, torch.split(x, 2, 1), strict=True)]
        return self.out(self.bn(self.act(torch.cat(parts, 1))))


def test_loop_over_split_is_analysed_by_recording() -> None:
    model = _randomize(SplitNet())
    x = torch.randn(2, 4, 5, 5)
    (pair,) = find_pairs(model, (x,))
    assert (pair.bn, pair.activation, pair.placement, pair.exact) == ("bn", "act", "after", True)
    result = convert(model, "before", method="exact", example_inputs=(x,))
    assert type(result.model) is SplitNet and result.moved[0].moved_to == "bn.0"
    _same(model, result.model, x)


class CachingAttention(nn.Module):
    """Caches a tensor in a plain attribute during forward in eval mode (timm LeViT's bias cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}
        self.cached: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.cached = self.bias * 2
            return x + self.cached[None, :, None, None]
        return x + self.bias[None, :, None, None] * 2


class CacheNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.GELU()
        self.attn = CachingAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.act(self.bn(self.conv(x))))


def test_analysis_never_changes_the_model() -> None:
    model = _randomize(CacheNet())
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_attrs = {name: dict(vars(m)) for name, m in model.named_modules()}
    find_pairs(model)
    bnmove.detect(model)
    convert(model, "after")
    assert model.attn.cached is None and model.attn.cache == {}  # no fx Proxy left behind
    assert {name: dict(vars(m)) for name, m in model.named_modules()} == before_attrs
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    # Converting the same model again works (a Proxy left in the cache would break this).
    again = convert(model, "after")
    assert len(again.moved) == 1


class SharedReluBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called at two places, a functional tanh too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)

    @property
    def channels(self) -> int:
        return self.conv1.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.relu(out + x)
        return torch.tanh(self.bn3(self.conv3(out)))


class Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.block = SharedReluBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.relu(self.bn(self.stem(x))))


def test_graph_moves_rewrite_only_the_forward_that_holds_them() -> None:
    model = _randomize(Top())
    calls: list[str] = []
    hooks = [
        model.block.register_forward_hook(lambda m, i, o: calls.append("block")),
        model.block.bn1.register_forward_hook(lambda m, i, o: calls.append("bn1")),
    ]
    x = torch.randn(2, 3, 6, 6)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    out = result.model
    assert {m.pair.bn for m in result.moved} == {"bn", "block.bn1", "block.bn3"}
    # The top level and the block keep their classes, properties and hooks; only their own
    # forward is regenerated (functional relu/tanh and the shared ReLU need node moves).
    assert type(out) is Top and type(out.block) is SharedReluBlock and out.block.channels == 4
    assert bnmove.core.forwards.generated_forward(out) is not None
    assert bnmove.core.forwards.generated_forward(out.block) is not None
    assert "forward" not in vars(out.stem)
    calls.clear()
    with torch.no_grad():
        out.eval()(x)
    assert calls == ["bn1", "block"]
    _same(model, out, x)
    # A second conversion reads the generated forwards (no exact way back here: fitted).
    back = convert(out, "before", example_inputs=(x,))
    assert {m.pair.bn for m in back.moved} == {"bn", "block.bn1", "block.bn3"}
    assert {p.bn: p.placement for p in find_pairs(back.model)} == {
        "bn": "before",
        "block.bn1": "before",
        "block.bn2": None,
        "block.bn3": "before",
    }
    # The converted model pickles and deep-copies with its generated forwards (without the
    # test's lambda hooks, which no pickle can hold).
    for handle in hooks:
        handle.remove()
    out.block._forward_hooks.clear()
    out.block.bn1._forward_hooks.clear()
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    _same(model, loaded, x)
    assert type(loaded) is Top
    _same(model, pickle.loads(pickle.dumps(out)), x)


class LibSwish(nn.Module):
    """A model library's own activation class (timm's Swish, HF's ACT2FN classes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class LibGELUTanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class StrangeAct(nn.Module):
    """Not a known function, but stateless, elementwise and non-linear: an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + 0.5 * x


class Scale(nn.Module):
    """Stateless and elementwise but affine: a link, not an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + 1


@pytest.mark.parametrize(
    ("act", "kind"),
    [(LibSwish(), "SiLU"), (LibGELUTanh(), "GELU"), (StrangeAct(), "StrangeAct"), (Scale(), None)],
    ids=["swish", "gelu-tanh", "unknown", "affine"],
)
def test_library_activation_classes_are_recognised_by_what_they_compute(
    act: nn.Module, kind: str | None
) -> None:
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), act, nn.Conv2d(4, 2, 1)))
    (pair,) = find_pairs(model)
    assert pair.activation_kind == kind
    if kind is not None:
        result = convert(model, "after", method="exact")
        assert [type(m).__name__ for m in result.model] == [
            "Conv2d",
            type(act).__name__,
            "BatchNorm2d",
            "Conv2d",
        ]
        x = torch.randn(2, 3, 4, 4)
        _same(model, result.model, x)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BN subclass with its activation inside; ``apply_act=False`` turns it off."""

    def __init__(self, n: int, apply_act: bool = True) -> None:
        super().__init__(n)
        self.drop = nn.Identity()
        self.act = nn.ReLU() if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class RepBranch(nn.Module):
    """RepVGG/MobileOne: an identity branch ``act -> BN`` whose activation output has several users."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.identity = BatchNormAct(4, apply_act=False)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = BatchNormAct(4, apply_act=False)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        y = self.conv(y) + self.identity(y)
        return self.act2(self.bn2(self.conv2(y)))


def test_fused_module_with_activation_off_is_a_plain_batchnorm() -> None:
    model = _randomize(RepBranch())
    pairs = {p.bn: p for p in find_pairs(model)}
    assert pairs["identity"].placement == "after" and not pairs["identity"].movable
    assert "also feeds" in (pairs["identity"].reason or "")
    assert (pairs["bn2"].activation, pairs["bn2"].placement, pairs["bn2"].exact) == ("act2", "before", True)
    result = convert(model, "after", method="exact")
    assert [m.pair.bn for m in result.moved] == ["bn2"]
    _same(model, result.model, torch.randn(2, 4, 5, 5))


class ListInDictOut(nn.Module):
    """torchvision detection models take ``list[Tensor]``; HF models return dict-like outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.stack(images)
        y = self.act(self.bn(self.conv(x)))
        return {"features": y, "pooled": y.mean((2, 3))}


def test_list_inputs_and_dict_outputs_are_verified_whole() -> None:
    model = _randomize(ListInDictOut())
    images = [torch.randn(3, 5, 5), torch.randn(3, 5, 5)]
    result = convert(model, "after", method="exact", example_inputs=(images,))
    assert len(result.moved) == 1 and result.verification is not None
    assert result.verification.within_tolerance and result.verification.input_shapes == [[3, 5, 5], [3, 5, 5]]
    # A wrong conversion is caught in every output, not only the first.
    swapped = convert(model, "after", method="swap", example_inputs=(images,))
    assert swapped.verification is not None and not swapped.verification.within_tolerance


def _deep_sensitive_net(depth: int = 30) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        conv = nn.Conv2d(16, 16, 1)
        nn.init.normal_(conv.weight, std=3.0 / 4)  # chaotic: tiny differences grow layer by layer
        layers += [conv, nn.BatchNorm2d(16), nn.Tanh()]
    return _randomize(nn.Sequential(*layers))


def test_exactness_is_decided_in_float64_when_float32_rounding_is_amplified() -> None:
    model = _deep_sensitive_net()
    x = torch.randn(2, 16, 3, 3)
    result = convert(model, "after", method="exact", example_inputs=(x,))  # must not raise
    dev = result.verification
    assert dev is not None and dev.within_tolerance
    assert dev.max_rel_error > dev.tolerance  # float32 alone would have cried wolf ...
    assert dev.float64_rel_error is not None and dev.float64_rel_error < 1e-9  # ... float64 says exact
    # A real change of function is still caught: the swap fails in float64 too.
    swapped = convert(model, "after", method="swap", example_inputs=(x,))
    assert swapped.verification is not None and not swapped.verification.within_tolerance


def test_zoo_models_keep_their_class_and_methods() -> None:
    from zoo import ZOO, build

    for name in ZOO:
        model, inputs = build(name)
        cls = type(model)
        methods = [
            k for k, v in vars(cls).items() if callable(v) and not k.startswith("_") and k != "forward"
        ]
        props = [k for k, v in vars(cls).items() if isinstance(v, property)]
        for placement in ("before", "after"):
            out = convert(model, placement, example_inputs=inputs).model
            assert type(out) is cls, name
            for prop in props:
                assert getattr(out, prop) == getattr(model, prop), (name, prop)
            for method in methods:  # the zoo's public methods take the model's input
                with torch.no_grad():
                    got, want = getattr(out.eval(), method)(*inputs), getattr(model.eval(), method)(*inputs)
                if placement == "before" or method != "forward_features":
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
                else:  # the after-variant's features are fitted where no exact move exists
                    assert got.shape == want.shape
    assert "forward_features" in vars(type(build("resnet")[0]))  # the loop above did call methods


class FrozenBN(nn.Module):
    """torchvision's FrozenBatchNorm2d in a few lines: a BN frozen into a fixed affine map."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.randn(n) * 0.3)
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


def test_frozen_batchnorm_is_detected_and_folded_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        FrozenBN(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 1),
        nn.GELU(),
        FrozenBN(4),
        nn.Conv2d(4, 2, 1),
    ).eval()
    pairs = find_pairs(model)
    assert [(p.bn, p.placement, p.exact) for p in pairs] == [("1", "before", True), ("5", "after", True)]
    x = torch.randn(2, 3, 7, 7)
    for placement in ("after", "before"):
        result = convert(model, placement, method="exact", example_inputs=(x,))
        (move,) = result.moved
        assert any("frozen BN" in note for note in move.notes)
        assert isinstance(result.model.get_submodule(move.moved_to or ""), FrozenBN)
        _same(model, result.model, x)
    # A module with the same buffers that computes something else is not a BN.
    assert not bnmove.analysis.batchnorms.is_frozen_batchnorm(NotFrozen(4))
    assert bnmove.analysis.batchnorms.is_frozen_batchnorm(FrozenBN(4))


class NotFrozen(FrozenBN):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.reshape(1, -1, 1, 1)


class SharedIdentityLink(nn.Module):
    """``act -> Identity -> BN`` where the Identity's output also feeds another branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()
        self.link = nn.Identity()
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.link(self.act(self.conv(x)))
        return self.bn(y) + self.other(y)


def test_pair_through_a_shared_link_is_reported_with_its_reason() -> None:
    (pair,) = find_pairs(SharedIdentityLink())
    assert (pair.bn, pair.activation, pair.placement, pair.movable) == ("bn", "act", "after", False)
    assert pair.reason == "the activation output also feeds other (Conv2d)"


class OptionalShortcutBlock(nn.Module):
    """timm's DlaBasic: a shared ReLU (graph move) in a forward that tests an optional argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class OtherCallsBlock(OptionalShortcutBlock):
    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if shortcut is not None:
            out = out + torch.sigmoid(shortcut)  # a call made only when the argument is given
        return self.relu(self.conv2(out))  # the ReLU serves two call sites: a graph move


def test_forward_that_tests_an_optional_argument_keeps_both_branches() -> None:
    model = _randomize(OptionalShortcutBlock())
    x, skip = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.pair.bn for m in result.moved] == ["bn1"]
    forward = bnmove.core.forwards.generated_forward(result.model)
    assert forward is not None and [sorted(nones) for nones, _ in forward.variants] == [[], ["shortcut"]]
    _same(model, result.model, x)  # shortcut left out: the variant that reads x
    _same(model, result.model, x, skip)  # shortcut given: the general variant
    _same(model, pickle.loads(pickle.dumps(result.model)), x, skip)


def test_forward_whose_calls_depend_on_an_optional_argument_is_not_rewritten() -> None:
    model = _randomize(OtherCallsBlock())
    (pair,) = [p for p in find_pairs(model) if p.bn == "bn1"]
    result = convert(model, "after", method="exact", example_inputs=(torch.randn(2, 4, 3, 3),))
    (move,) = [m for m in result.moves if m.pair.bn == pair.bn]
    assert not move.moved
    assert "makes other calls when `shortcut` is not given" in (move.reason or "")


COMPOSITES = {
    "silu": (lambda x: x * torch.sigmoid(x), "SiLU"),
    "hardswish": (lambda x: x * F.relu6(x + 3) / 6, "Hardswish"),
    "mish": (lambda x: x * torch.tanh(F.softplus(x)), "Mish"),
    "gelu-tanh": (
        lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
        "GELU",
    ),
    "relu-clamp": (lambda x: x.clamp(min=0), "ReLU"),
}


class CompositeNet(nn.Module):
    """An activation written out in the model's own forward, before and after a BN."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = COMPOSITES[self.name][0]
        x = act(self.bn1(self.conv1(x)))  # BN -> composite
        return self.head(self.bn2(act(self.conv2(x))))  # composite -> BN


@pytest.mark.parametrize("name", list(COMPOSITES))
def test_composite_activations_are_one_activation_and_move(name: str) -> None:
    model = _randomize(CompositeNet(name))
    kind = COMPOSITES[name][1]
    pairs = find_pairs(model)
    assert [(p.bn, p.activation_kind, p.placement, p.exact) for p in pairs] == [
        ("bn1", kind, "before", True),
        ("bn2", kind, "after", True),
    ]
    x = torch.randn(2, 3, 5, 5)
    for placement in ("after", "before"):
        result = convert(model, placement, method="exact", example_inputs=(x,))
        assert len(result.moved) == 1 and type(result.model) is CompositeNet
        _same(model, result.model, x)
    both = convert(model, "after", method="swap", example_inputs=(x,))
    assert [p.placement for p in find_pairs(both.model)] == ["after", "after"]


def test_a_composite_that_is_no_known_activation_stays_as_written() -> None:
    from bnmove.analysis.composite import collapse_composites

    graph = torch.fx.symbolic_trace(nn.Sequential(LibSwish(), Scale())).graph  # x*sigmoid(x), then 2x+1
    before = [n.target for n in graph.nodes if n.op == "call_function"]
    assert collapse_composites(graph) == 1
    after = [n.target for n in graph.nodes if n.op == "call_function"]
    assert F.silu in after and torch.sigmoid not in after and len(after) == len(before) - 1


class StaticSamePadConv(nn.Conv2d):
    """efficientnet_pytorch's Conv2dStaticSamePadding: a Conv2d subclass that pads in its own forward."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, bias=False)
        self.static_padding = nn.ZeroPad2d(k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)


def test_library_conv_with_its_own_forward_absorbs_a_bn_where_the_math_allows() -> None:
    model = _randomize(
        nn.Sequential(
            StaticSamePadConv(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), StaticSamePadConv(4, 4, 1),
            nn.ReLU(), nn.BatchNorm2d(4), StaticSamePadConv(4, 4, 3),
        )
    )  # fmt: skip
    pairs = {p.bn: p for p in find_pairs(model)}
    assert pairs["1"].exact and pairs["1"].neighbour == "0"  # folds backward: padding comes first
    assert pairs["5"].keeps_affine  # folding forward would shift the zero padding
    assert "its own forward (StaticSamePadConv) pads" in (pairs["5"].reason or "")
    x = torch.randn(2, 3, 6, 6)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.pair.bn for m in result.moved] == ["1"]
    _same(model, result.model, x)


def test_module_surgery_result_loads_without_bnmove(tmp_path: pathlib.Path) -> None:
    """Moves made by module surgery leave only torch modules and the user's classes in the pickle."""
    from zoo import build

    model, inputs = build("mlp")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert len(result.moved) == 1
    assert not any("forward" in vars(m) for m in result.model.modules())  # no generated forward here
    path = tmp_path / "converted.pt"
    torch.save(result.model, path)
    torch.save(inputs[0], tmp_path / "x.pt")
    want = result.model.eval()(inputs[0])
    torch.save(want, tmp_path / "want.pt")
    code = (
        "import sys; sys.modules['bnmove'] = None\n"  # any import of bnmove now fails
        f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
        "import torch, zoo\n"
        f"m = torch.load({str(path)!r}, weights_only=False).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); want = torch.load({str(tmp_path / 'want.pt')!r})\n"
        "assert torch.allclose(m(x), want, atol=1e-6), 'outputs differ'\n"
        "print(type(m).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == type(model).__name__

"""Exact moves where no layer absorbs the BN: its eval-mode affine map stays as a ChannelAffine layer.

``X -> BN -> f`` becomes ``X -> A -> f -> BN'`` and ``f -> BN -> N`` becomes
``BN' -> f -> A -> N``: eval outputs are unchanged for every activation and in
every form an activation is written (module, function, method, in place, fused).
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnmove
from bnmove import convert, find_pairs
from bnmove.core.affine import ChannelAffine

FORMS = ["module", "function", "method", "inplace"]


def _act(form: str, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if form == "module":
        return module(x)
    if form == "function":
        return F.gelu(x)
    if form == "method":
        return x.tanh()
    return F.relu(x, inplace=True)


class PreAct(nn.Module):
    """Pre-activation blocks ``x + conv(f(BN(x)))``: the BN is fed by an add."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.act = nn.SiLU()
        self.conv1, self.conv2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv1(_act(self.form, self.bn1(x), self.act))
        return x + self.conv2(_act(self.form, self.bn2(x), self.act))


class Mixed(nn.Module):
    """BN after a concatenation, BN after pooling, and ``f -> BN -> padded conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.bn_cat = nn.BatchNorm2d(8)
        self.act1 = nn.Hardswish()
        self.pool = nn.AvgPool2d(2)
        self.bn_pool = nn.BatchNorm2d(8)
        self.act2 = nn.ELU()
        self.conv = nn.Conv2d(8, 8, 1)
        self.act3 = nn.Mish()
        self.bn_pad = nn.BatchNorm2d(8)
        self.padded = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn_cat(torch.cat([self.a(x), self.b(x)], 1)))
        y = self.act2(self.bn_pool(self.pool(y)))
        return self.padded(self.bn_pad(self.act3(self.conv(y))))


def _trained_like(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics from real batches and non-trivial affine parameters, as training leaves them."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) * 1.5 - 0.25)  # some negative
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(x + 0.1 * torch.randn(x.shape, generator=gen))
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(x.clone())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("there", ["after", "before"], ids=["to-after", "round-trip"])
def test_pre_activation_blocks_move_exactly_keeping_the_affine(form: str, there: str) -> None:
    x = torch.randn(16, 3, 6, 6)
    model = _trained_like(PreAct(form), x)
    pairs = find_pairs(model)
    assert [(p.bn, p.placement, p.exact, p.keeps_affine) for p in pairs] == [
        ("bn1", "before", True, True),
        ("bn2", "before", True, True),
    ]
    after = convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.method for m in after.moved] == ["exact-kept-affine"] * 2
    assert sum(isinstance(m, ChannelAffine) for m in after.model.modules()) == 2
    torch.testing.assert_close(_outputs(after.model, x), _outputs(model, x), atol=1e-5, rtol=1e-4)
    assert {p.placement for p in find_pairs(after.model)} == {"after"}
    if there == "before":  # and back: exact again, the affine stays a layer
        back = convert(after.model, "before", example_inputs=(x,))
        assert all(m.keeps_outputs for m in back.moved) and len(back.moved) == 2
        torch.testing.assert_close(_outputs(back.model, x), _outputs(model, x), atol=1e-5, rtol=1e-4)
    # In train mode BN' normalises with the batch's statistics, which it starts close to.
    train_out, train_ref = _outputs(after.model, x, train=True), _outputs(model, x, train=True)
    rel = float((train_out - train_ref).norm() / train_ref.norm())
    assert rel < 0.5, rel


def test_concat_pooling_and_padded_conv_keep_the_affine_both_ways() -> None:
    x = torch.randn(16, 3, 6, 6)
    model = _trained_like(Mixed(), x)
    pairs = {p.bn: p for p in find_pairs(model)}
    assert {bn: (p.placement, p.keeps_affine) for bn, p in pairs.items()} == {
        "bn_cat": ("before", True),
        "bn_pool": ("before", True),
        "bn_pad": ("after", True),
    }
    for placement, moved in (("after", {"bn_cat", "bn_pool"}), ("before", {"bn_pad"})):
        result = convert(model, placement, method="exact", example_inputs=(x,))
        assert {m.pair.bn for m in result.moved} == moved
        assert all(m.method == "exact-kept-affine" for m in result.moved)
        torch.testing.assert_close(_outputs(result.model, x), _outputs(model, x), atol=1e-5, rtol=1e-4)
    # Slots: the BN's slot holds the affine, the activation and BN' in order.
    after = convert(model, "after", method="exact", example_inputs=(x,)).model
    assert [type(m).__name__ for m in after.bn_cat] == ["ChannelAffine", "Hardswish", "BatchNorm2d"]
    assert isinstance(after.act1, nn.Identity)


class FusedAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = BatchNormReLU(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.out(self.bn(y + y.flip(-1)))


class BatchNormReLU(nn.BatchNorm2d):
    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # as timm writes it
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return self.act(x)


def test_fused_module_fed_by_an_add_keeps_the_affine() -> None:
    x = torch.randn(16, 3, 5, 5)
    model = _trained_like(FusedAfterAdd(), x)
    (pair,) = find_pairs(model)
    assert pair.fused and pair.keeps_affine
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert [type(m).__name__ for m in result.model.bn] == ["ChannelAffine", "ReLU", "BatchNorm2d"]
    torch.testing.assert_close(_outputs(result.model, x), _outputs(model, x), atol=1e-5, rtol=1e-4)


def test_channel_affine_any_rank_dtype_and_a_later_fold_into_it() -> None:
    affine = ChannelAffine(3, dtype=torch.float64)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        affine.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    for shape in [(4, 3), (4, 3, 5), (2, 3, 4, 4), (2, 3, 2, 2, 2)]:
        x = torch.randn(shape, dtype=torch.float64)
        view = (1, 3) + (1,) * (len(shape) - 2)
        torch.testing.assert_close(affine(x), x * affine.weight.view(view) + affine.bias.view(view))
    # A BN next to a kept affine folds into it exactly, in both directions: to float64's rounding
    # in float64; in float32 as the conversion's own check judges it (a channel whose running
    # variance is tiny amplifies float32 rounding past 1e-4 of the outputs for 4 seeds in 60).
    torch.manual_seed(0)
    model = nn.Sequential(ChannelAffine(4), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4), ChannelAffine(4))
    x = torch.randn(16, 4, 3, 3)
    _trained_like(model, x)
    pairs = find_pairs(model)
    assert [(p.bn, p.neighbour) for p in pairs] == [("1", "0"), ("3", "4")]
    wide, x_wide = copy.deepcopy(model).double(), x.double()
    for placement in ("after", "before"):
        result = convert(model, placement, method="exact", example_inputs=(x,))
        assert [m.method for m in result.moved] == ["exact"]
        assert result.verification is not None and result.verification.within_tolerance
        torch.testing.assert_close(_outputs(result.model, x), _outputs(model, x), atol=1e-5, rtol=1e-4)
        converted = convert(wide, placement, method="exact", example_inputs=(x_wide,)).model
        torch.testing.assert_close(
            _outputs(converted, x_wide), _outputs(wide, x_wide), atol=1e-12, rtol=1e-10
        )


def test_kept_affine_exports_to_onnx_and_onnxruntime_agrees(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 6, 6)
    model = _trained_like(Mixed(), x)
    paths = bnmove.export_variants(model, (x,), tmp_path, ["after", "before"])
    session_ref = ort.InferenceSession(str(paths["after"]), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session_ref.get_inputs()]
    for variant, path in paths.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: x.numpy()})[0]
        np.testing.assert_allclose(got, _outputs(model, x).numpy(), atol=1e-4, rtol=1e-4, err_msg=variant)


def test_a_kept_affine_is_torch_only_and_one_saved_by_bnmove_0_1_still_loads() -> None:
    """``ChannelAffine(C)`` is a torch.fx GraphModule (its pickle names no bnmove module), recognised
    by ``isinstance`` after a deep copy and a round trip; the layer class of bnmove 0.1, which files
    saved then name, unpickles and computes the same map."""
    affine = ChannelAffine(3)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
        affine.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    assert isinstance(affine, torch.fx.GraphModule) and b"bnmove" not in pickle.dumps(affine)
    x = torch.randn(2, 3, 4, 5)
    want = x * affine.weight.view(1, 3, 1, 1) + affine.bias.view(1, 3, 1, 1)
    for again in (copy.deepcopy(affine), pickle.loads(pickle.dumps(affine))):
        assert isinstance(again, ChannelAffine)
        torch.testing.assert_close(again(x), want)
    old = ChannelAffine.__new__(ChannelAffine)  # as unpickling a file of bnmove 0.1 makes it
    nn.Module.__init__(old)
    old.weight, old.bias = (
        nn.Parameter(affine.weight.detach().clone()),
        nn.Parameter(affine.bias.detach().clone()),
    )
    loaded = pickle.loads(pickle.dumps(old))
    assert type(loaded) is ChannelAffine and isinstance(loaded, ChannelAffine)
    torch.testing.assert_close(loaded(x), want)
    assert not isinstance(nn.Linear(3, 3), ChannelAffine)


def test_a_kept_affine_built_with_the_shared_code_is_an_ordinary_graph_module() -> None:
    """Kept affines take the code all of them share when built; the code is what fx generates for
    their graph, the module computes ``weight·x + bias`` per channel, scripts, and a later edit of
    its graph is compiled by torch's own recompile."""
    affine = ChannelAffine(3)
    assert isinstance(affine, torch.fx.GraphModule)
    assert affine.code == affine.graph.python_code(root_module="self").src
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
        affine.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    x = torch.randn(2, 3, 4)
    want = x * affine.weight.view(1, 3, 1) + affine.bias.view(1, 3, 1)
    torch.testing.assert_close(affine(x), want, rtol=0, atol=0)
    torch.testing.assert_close(torch.jit.script(affine)(x), want, rtol=0, atol=0)
    other = ChannelAffine(3)  # each has its own graph, and its own class to hold its forward
    assert other.graph is not affine.graph and type(other) is not type(affine)
    (out,) = [n for n in affine.graph.nodes if n.op == "output"]
    with affine.graph.inserting_before(out):
        doubled = affine.graph.call_function(torch.mul, (out.args[0], 2.0))
    out.args = (doubled,)
    affine.recompile()
    torch.testing.assert_close(affine(x), 2 * want, rtol=0, atol=0)
    torch.testing.assert_close(other(x), x, rtol=0, atol=0)  # the others keep their code


def test_a_kept_affine_copies_its_graph_only_when_it_is_read() -> None:
    """A new kept affine holds no graph of its own until one is read (the copy is most of what
    making one costs); reading gives it its own copy of the template's, which an edit changes for
    that layer alone. A copy of a layer not yet read is made without one too, a copy of an edited
    one keeps the edit, and deep copies and pickles of an unread one compute the same map and load
    as a plain GraphModule."""
    from bnmove.core.clone import clone_module

    affine, other = ChannelAffine(3), ChannelAffine(3)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([1.5, -2.0, 0.5]))
        affine.bias.copy_(torch.tensor([0.25, 1.0, -1.0]))
    assert "_graph" not in vars(affine)
    x = torch.randn(2, 3, 4, 4)
    want = x * affine.weight.view(1, 3, 1, 1) + affine.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(affine(x), want, rtol=0, atol=0)
    lazy = clone_module(affine)
    assert "_graph" not in vars(lazy)
    torch.testing.assert_close(lazy(x), want, rtol=0, atol=0)
    for again in (copy.deepcopy(affine), pickle.loads(pickle.dumps(affine))):
        assert isinstance(again, ChannelAffine) and again.code == affine.code
        torch.testing.assert_close(again(x), want, rtol=0, atol=0)
    loaded = pickle.loads(pickle.dumps(ChannelAffine(3)))
    assert type(loaded).__mro__[1] is torch.fx.GraphModule  # what torch alone rebuilds
    graph = affine.graph
    assert "_graph" in vars(affine) and graph.owning_module is affine
    assert other.graph is not graph and len(other.graph.nodes) == len(graph.nodes)
    (out,) = [n for n in graph.nodes if n.op == "output"]
    with graph.inserting_before(out):
        negated = graph.call_function(torch.neg, (out.args[0],))
    out.args = (negated,)
    affine.recompile()
    torch.testing.assert_close(affine(x), -want, rtol=0, atol=0)
    torch.testing.assert_close(clone_module(affine)(x), -want, rtol=0, atol=0)
    torch.testing.assert_close(pickle.loads(pickle.dumps(affine))(x), -want, rtol=0, atol=0)
    torch.testing.assert_close(other(x), x, rtol=0, atol=0)  # weight 1, bias 0: its own code
    torch.testing.assert_close(ChannelAffine(3)(x), x, rtol=0, atol=0)  # the template is untouched


def test_the_identity_test_reads_the_first_channel_first_and_decides_as_the_full_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An identity BN (BN′) nudged by 0 to 12 ulps in one channel's weight or bias, the first or
    another, float32 and float64, and a kept affine likewise: the early look at the first channel
    never decides otherwise than the per-channel test alone."""
    from bnmove.core import affine

    cases: list[tuple[nn.Module, bool]] = []
    for dtype in (torch.float32, torch.float64):
        for channel in (0, 3):
            for which in ("weight", "bias"):
                for ulps in (0, 2, 4, 5, 8, 12):
                    bn = nn.BatchNorm2d(5).to(dtype).eval()
                    with torch.no_grad():
                        bn.running_mean.uniform_(-1, 1)
                        bn.running_var.uniform_(0.5, 2)
                        bn.weight.copy_((bn.running_var + bn.eps).sqrt())
                        bn.bias.copy_(bn.running_mean)
                        t = getattr(bn, which)
                        step = torch.finfo(dtype).eps * max(float(t[channel].abs()), 1.0)
                        t[channel] += ulps * step
                    cases.append((bn, affine.is_identity(bn)))
                    kept = ChannelAffine(5, dtype=dtype)
                    with torch.no_grad():
                        getattr(kept, which)[channel] += ulps * torch.finfo(dtype).eps
                    cases.append((kept, affine.is_identity(kept)))
    assert {decided for _, decided in cases} == {True, False}
    monkeypatch.setattr(affine, "_first_channel_far", lambda bn, u: False)
    assert [affine.is_identity(m) for m, _ in cases] == [decided for _, decided in cases]

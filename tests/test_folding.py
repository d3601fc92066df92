from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import build, randomize_bn

import bnmove
from bnmove.deploy.export import ExportOptions, export_variants
from bnmove.deploy.folding import Fate, fold_forward


@pytest.mark.parametrize(
    ("name", "folded", "identity"),
    [
        ("mlp", {"bn2": "fc3"}, {"bn1.1"}),  # bn1 moved: its slot is Sequential(act, bn)
        ("nested", {"stage.1.bn": "stage.1.proj"}, {"stage.0.1", "stage.3"}),
        ("conv1d", {"bn2": "conv3"}, {"bn.1"}),
    ],
)
def test_fold_forward_after_variant(name: str, folded: dict[str, str], identity: set[str]) -> None:
    """The BNs the model had after its activations fold forward; the BN′ each exact move left (the
    identity in eval mode) is removed wherever it stands, even where nothing could fold it."""
    model, inputs = build(name)
    after = bnmove.convert(model, "after", example_inputs=inputs).model
    result = fold_forward(after)
    assert {b.bn: b.into for b in result.bns if b.fate == "folded-forward"} == folded
    assert {b.bn for b in result.bns if b.fate == "identity"} == identity
    assert not result.standalone
    assert {type(b.fate) for b in result.bns} == {Fate}  # typed, and the manifest holds the values
    assert {b["fate"] for b in json.loads(json.dumps(result.manifest()))["bns"]} <= {f.value for f in Fate}
    assert_same_outputs(after, result.model, inputs)
    remaining = {n for n, m in result.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    called = {p.bn for p in bnmove.find_pairs(result.model)}
    assert not (set(folded) & called) and set(folded).isdisjoint(remaining & called)


def test_fold_forward_leaves_conv_bn_for_the_runtime() -> None:
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    ).eval()
    result = fold_forward(model)
    assert [(b.bn, b.fate, b.into) for b in result.bns] == [("1", "fused-backward", "0")]
    x = torch.randn(2, 3, 6, 6)
    assert_same_outputs(model, result.model, (x,))


def test_kept_affine_folds_forward_like_a_batchnorm() -> None:
    torch.manual_seed(0)
    affine = bnmove.core.affine.ChannelAffine(6)
    with torch.no_grad():
        affine.weight.uniform_(0.5, 1.5)
        affine.bias.normal_()
    last = bnmove.core.affine.ChannelAffine(3)
    with torch.no_grad():
        last.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), affine, nn.Linear(6, 3), nn.Tanh(), last)
    result = fold_forward(model)
    assert [(b.bn, b.fate, b.into) for b in result.bns] == [
        ("2", "folded-forward", "3"),
        ("5", "standalone", None),
    ]
    assert isinstance(result.model[2], nn.Identity)
    assert_same_outputs(model, result.model, (torch.randn(5, 4),))


def _identity_bn(n: int, dtype: torch.dtype = torch.float32) -> nn.BatchNorm2d:
    """BN′ as an exact move leaves it: real statistics, weight ``√(var+ε)``, bias ``mean``."""
    bn = nn.BatchNorm2d(n).to(dtype).eval()
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=g) * 4 - 1)
        bn.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.01)
        bn.weight.copy_(torch.sqrt(bn.running_var.double() + bn.eps))
        bn.bias.copy_(bn.running_mean)
    return bn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_identity_bn_is_removed_wherever_it_stands(dtype: torch.dtype) -> None:
    """BN′ of an exact move only normalises in training: in eval it passes its input through, to
    its dtype's rounding, so deployment removes it even where no layer could take a fold (here: it
    feeds an add and a padded conv), and a map one part in 10⁵ away from the identity stays."""

    class Residual(nn.Module):
        def __init__(self, bn: nn.BatchNorm2d) -> None:
            super().__init__()
            self.conv, self.act, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), bn
            self.next = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.act(self.conv(x)))
            return self.next(y) + y

    torch.manual_seed(0)
    model = Residual(_identity_bn(4, dtype)).to(dtype).eval()
    result = fold_forward(model, padded=True)
    (fate,) = result.bns
    assert (fate.fate, fate.into) == ("identity", None) and "identity in eval mode" in (fate.reason or "")
    assert isinstance(result.model.bn, nn.Identity) and type(result.model) is Residual
    x = torch.randn(2, 4, 9, 9, dtype=dtype)
    with torch.no_grad():
        want, got = model(x), result.model(x)
    u = torch.finfo(dtype).eps
    assert (want - got).abs().max() <= 8 * u * want.abs().max(), (want - got).abs().max()
    with torch.no_grad():
        model.bn.weight.mul_(1 + 1e-5)
    (fate,) = fold_forward(model, padded=True).bns
    assert fate.fate == "standalone" and "feeds" in (fate.reason or "")


def test_an_identity_kept_affine_is_removed_and_one_nearly_so_is_not() -> None:
    affine = bnmove.core.affine.ChannelAffine(4)
    model = nn.Sequential(nn.ReLU(), affine, nn.Conv2d(4, 2, 3, padding=1)).eval()
    (fate,) = fold_forward(model).bns
    assert fate.fate == "identity" and isinstance(fold_forward(model).model[1], nn.Identity)
    with torch.no_grad():
        affine.bias[0] = 1e-6
    (fate,) = fold_forward(model).bns
    assert fate.fate == "standalone"


def _bn(n: int, negative: bool = False) -> nn.BatchNorm2d:
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(n).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        if negative:
            bn.weight[0] = -0.7
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize(
    ("pool", "negative", "fate", "through"),
    [
        (nn.MaxPool2d(3, 2, 1), False, "folded-forward", ("2",)),
        (nn.MaxPool2d(3, 2, 1), True, "standalone", ()),
        (nn.AvgPool2d(2), False, "folded-forward", ("2",)),
        (nn.AvgPool2d(3, 1, 1), False, "standalone", ()),
        (nn.AvgPool2d(3, 1, 1, count_include_pad=False), True, "folded-forward", ("2",)),
    ],
    ids=["maxpool", "maxpool-negative-scale", "avgpool", "avgpool-counting-padding", "avgpool-no-pad-count"],
)
def test_fold_through_pooling(pool: nn.Module, negative: bool, fate: str, through: tuple[str, ...]) -> None:
    model = nn.Sequential(nn.ReLU(), _bn(4, negative), pool, nn.Conv2d(4, 3, 1)).eval()
    result = fold_forward(model)
    (bn,) = result.bns
    assert (bn.fate, bn.through) == (fate, through)
    if fate == "standalone":
        assert "maximum" in (bn.reason or "") or "zero padding" in (bn.reason or "")
    assert_same_outputs(model, result.model, (torch.randn(2, 4, 7, 7),))


def test_fold_through_adaptive_pooling_and_flatten_into_a_linear() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        _bn(4, negative=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    ).eval()
    result = fold_forward(model)
    (bn,) = result.bns
    assert (bn.fate, bn.into, bn.through) == ("folded-forward", "5", ("3", "4"))
    assert isinstance(result.model[2], nn.Identity)
    assert_same_outputs(model, result.model, (torch.randn(2, 3, 6, 6),))


# --- border-exact folding into zero-padded convs (deploy/border.py) ---

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BNS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _padded_block(dims: int, kernel: int, stride: int, dilation: int, groups: int | str, channels: int = 8):
    """act -> BN (non-trivial, one negative scale) -> zero-padded conv, the after-variant's shape."""
    groups = channels if groups == "depthwise" else int(groups)
    conv = _CONVS[dims](
        channels, 8, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, groups=groups
    )
    return randomize_bn(nn.Sequential(nn.ReLU(), _BNS[dims](channels), conv), seed=kernel + stride).eval()


def _input(dims: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, *[size + i for i in range(dims)], generator=g)  # uneven sizes on purpose


@pytest.mark.parametrize(
    ("dims", "kernel", "stride", "dilation", "groups"),
    [
        (2, 3, 1, 1, 1),
        (2, 5, 1, 1, 1),
        (2, 7, 2, 1, 1),
        (2, 3, 2, 1, 4),
        (2, 3, 1, 2, "depthwise"),
        (2, 5, 2, 2, "depthwise"),
        (1, 3, 1, 1, 1),
        (1, 7, 2, 2, 4),
        (3, 3, 1, 1, 1),
        (3, 3, 2, 1, "depthwise"),
    ],
)
def test_border_corrected_fold_is_exact_at_every_size(
    dims: int, kernel: int, stride: int, dilation: int, groups: int | str
) -> None:
    model = _padded_block(dims, kernel, stride, dilation, groups)
    plain = fold_forward(model)
    assert [b.fate for b in plain.bns] == ["standalone"] and "--fold-padded" in (plain.bns[0].reason or "")
    result = fold_forward(model, padded=True)
    (bn,) = result.bns
    assert (bn.fate, bn.into, bn.form) == ("folded-forward", "2", "border-corrected")
    assert isinstance(result.model[1], nn.Identity)
    for size in (9, 16):  # one export size, and others: the correction follows the input's shape
        x = _input(dims, size, seed=size)
        with torch.no_grad():
            want, got = model(x).double(), result.model(x).double()
        # float32 rounding of a sum of up to 8·k^dims products, relative to the outputs' magnitude
        assert (want - got).abs().max() <= 1e-5 * want.abs().max(), (want - got).abs().max()
    assert not torch.equal(model[2].weight, result.model[2].conv.weight)  # the scale went into the weights


def test_border_correction_matches_a_float64_reference() -> None:
    """Exact, not close: in float64 the folded conv reproduces BN -> padded conv to 1e-12."""
    model = _padded_block(2, 5, 2, 2, 4).double()
    result = fold_forward(model, padded=True)
    x = _input(2, 13).double()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-12, atol=1e-12)


def test_same_padding_and_non_zero_padding_modes() -> None:
    same = randomize_bn(
        nn.Sequential(nn.GELU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 5, padding="same", dilation=2))
    ).eval()
    result = fold_forward(same, padded=True)
    assert result.bns[0].form == "border-corrected"
    assert_same_outputs(same, result.model, (torch.randn(2, 4, 11, 7),))
    # reflect/replicate/circular pad with copies of the input: the plain fold is exact, no correction
    for mode in ("reflect", "replicate", "circular"):
        conv = nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode)
        model = randomize_bn(nn.Sequential(nn.GELU(), nn.BatchNorm2d(4), conv)).eval()
        result = fold_forward(model)
        assert [(b.fate, b.form) for b in result.bns] == [("folded-forward", "weights")], mode
        assert isinstance(result.model[2], nn.Conv2d)
        assert_same_outputs(model, result.model, (torch.randn(2, 4, 9, 9),))


@pytest.mark.parametrize(
    ("dims", "kernel", "stride", "dilation", "groups"),
    [(2, 3, 1, 1, "depthwise"), (2, 7, 2, 1, 1), (1, 5, 2, 2, 4), (3, 3, 1, 1, 1)],
)
def test_border_corrected_fold_under_onnxruntime(
    tmp_path: Path, dims: int, kernel: int, stride: int, dilation: int, groups: int | str
) -> None:
    """The exported fold agrees with the unfolded block, and onnxruntime runs it as Conv + Add:
    no BatchNormalization left after its optimisations, the correction folded to one constant."""
    import onnxruntime as ort

    model = _padded_block(dims, kernel, stride, dilation, groups)
    x = _input(dims, 12)
    paths = export_variants(model, (x,), tmp_path / "plain", ["original"], stem="m")
    folded = export_variants(
        model, (x,), tmp_path / "folded", ["original"], stem="m", options=ExportOptions(fold="padded")
    )
    runs = {}
    for name, path in (("plain", paths["original"]), ("folded", folded["original"])):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.opt.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs[name] = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = runs["plain"]
    assert abs(runs["folded"] - want).max() <= 1e-5 * abs(want).max()
    with torch.no_grad():
        assert abs(runs["folded"] - model(x).numpy()).max() <= 1e-5 * abs(want).max()
    manifest = json.loads((tmp_path / "folded" / "manifest.json").read_text())
    assert manifest["fold_padded"] and "exported spatial size" in manifest["border_correction"]
    (fate,) = manifest["variants"]["original"]["bns"]
    assert (fate["fate"], fate["form"]) == ("folded-forward", "border-corrected")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "folded.opt.onnx")).graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Conv"] == 1 and ops["Add"] == 1, ops
    assert set(ops) <= {"Conv", "Add", "Relu"}, ops  # the correction's own conv was folded at load time


@pytest.mark.parametrize(
    ("call", "negative", "fate"),
    [
        (lambda z: torch.nn.functional.adaptive_avg_pool2d(z, 1), True, "folded-forward"),
        (lambda z: torch.nn.functional.avg_pool2d(z, 2), True, "folded-forward"),
        (lambda z: torch.nn.functional.avg_pool2d(z, 3, 1, 1), False, "standalone"),
        (
            lambda z: torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False),
            True,
            "folded-forward",
        ),
        (lambda z: torch.nn.functional.max_pool2d(z, 3, 2, 1), False, "folded-forward"),
        (lambda z: torch.nn.functional.max_pool2d(z, 3, 2, 1), True, "standalone"),
        (lambda z: z.mean((2, 3), keepdim=True), True, "folded-forward"),
        (lambda z: z.mean(1, keepdim=True), False, "standalone"),
    ],
    ids=[
        "adaptive-avg",
        "avg",
        "avg-counting-padding",
        "avg-no-pad-count",
        "max",
        "max-negative",
        "mean-hw",
        "mean-c",
    ],
)
def test_fold_through_functional_pooling(call, negative: bool, fate: str) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            channels = call(torch.zeros(1, 4, 4, 4)).shape[1]
            self.act, self.bn, self.proj = nn.ReLU(), _bn(4, negative), nn.Conv2d(channels, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(call(self.bn(self.act(x))))

    model = Head().eval()
    result = fold_forward(model)
    (bn,) = result.bns
    assert bn.fate == fate, bn
    if fate == "standalone":
        assert bn.reason
    assert_same_outputs(model, result.model, (torch.randn(2, 4, 8, 8),))


def test_a_bn_after_a_border_corrected_conv_is_folded_by_bnmove(tmp_path: Path) -> None:
    """conv -> ReLU -> BN -> padded conv -> BN' -> ReLU: with --fold-padded the first BN folds
    into the padded conv as Conv + Add; a runtime can no longer fuse BN' into that conv (the Add
    stands between them), so bnmove folds it: no BatchNormalization is left, outputs unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    randomize_bn(model)
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    folding = fold_forward(model, padded=True)
    fates = {f.bn: (f.fate, f.into, f.form) for f in folding.bns}
    assert fates == {"2": ("folded-forward", "3", "border-corrected"), "4": ("fused-backward", "3", None)}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folding.model.modules())
    for size in (8, 11):  # the correction is exact at every input size
        y = torch.randn(4, 1, size, size)
        assert_same_outputs(model, folding.model, (y,))
    with torch.no_grad():
        ref = model.double()(x.double())
        got = fold_forward(model, padded=True).model.double()(x.double())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    paths = export_variants(
        model.float(), (x,), tmp_path, ("original",), options=ExportOptions(fold="padded")
    )
    ops = Counter(n.op_type for n in onnx.load(str(paths["original"])).graph.node)
    assert ops["BatchNormalization"] == 0 and ops["Add"] == 1


class _TwoBranches(nn.Module):
    """conv -> ReLU -> BN -> max pool, read by a block's conv and by its shortcut conv (ResNet's stem)."""

    def __init__(self, padded_branch: bool = False) -> None:
        super().__init__()
        self.stem, self.relu, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 16, 3, padding=1) if padded_branch else nn.Conv2d(8, 16, 1)
        self.shortcut = nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.bn(self.relu(self.stem(x))))
        return torch.relu(self.conv(x)) + self.shortcut(x)


@pytest.mark.parametrize("padded_branch", [False, True])
def test_a_bn_feeding_several_layers_folds_into_each(padded_branch: bool) -> None:
    model = randomize_bn(_TwoBranches(padded_branch)).eval()
    with torch.no_grad():
        model.bn.weight.abs_()  # a positive scale passes the max pool
    x = torch.randn(3, 1, 8, 8)
    plain = fold_forward(model)
    if padded_branch:  # one branch pads with zeros: only --fold-padded folds into it
        assert plain.bns[0].fate == "standalone"
    folding = fold_forward(model, padded=True)
    (fate,) = folding.bns
    assert (fate.fate, fate.into, fate.through) == ("folded-forward", "conv, shortcut", ("pool",))
    assert fate.form == ("weights and border-corrected" if padded_branch else "weights")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folding.model.modules())
    for size in (8, 12):
        assert_same_outputs(model, folding.model, (torch.randn(3, 1, size, size),))
    assert_same_outputs(model, plain.model, (x,))


def test_a_bn_feeding_a_layer_and_a_sum_stays_with_the_reason() -> None:
    class LayerAndSum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relu, self.bn, self.conv = nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.relu(x))
            return self.conv(y) + y

    (fate,) = fold_forward(randomize_bn(LayerAndSum()).eval()).bns
    assert fate.fate == "standalone" and "feeds conv (Conv2d), add" in (fate.reason or "")


class _HomogeneousThenPadded(nn.Module):
    """``conv → ReLU → BN → padded conv``: ReLU is positively homogeneous, so ``|a|`` can go behind it."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv, self.act, self.bn = nn.Conv2d(3, 4, 3), act(), nn.BatchNorm2d(4)
        self.next = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.next(self.bn(self.act(self.conv(x))))


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.SiLU])
def test_the_scale_goes_behind_a_homogeneous_activation_and_only_signs_fold_forward(
    act: type[nn.Module],
) -> None:
    """``a·f(z) + b = sign(a)·f(|a|·z) + b`` for ``f`` positively homogeneous: the conv before ``f``
    takes ``|a|`` per output channel and the next conv's weights keep their magnitudes, which
    per-channel INT8 weights need (the issue's -3.1 points came from scaling them per input channel)."""
    torch.manual_seed(0)
    model = _HomogeneousThenPadded(act).eval()
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor([2.0, -0.5, 0.25, 3.0]))
        model.bn.bias.normal_()
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    folding = fold_forward(model, padded=True)
    (fate,) = [f for f in folding.bns if f.bn == "bn"]
    homogeneous = act is not nn.SiLU
    assert fate.scale_into == ("conv" if homogeneous else None)
    for size in (9, 12):
        assert_same_outputs(model, folding.model, (torch.randn(2, 3, size, size),), rtol=1e-5)
    kept = folding.model.next.conv.weight.detach()
    if homogeneous:
        assert torch.equal(kept.abs(), model.next.weight.detach().abs())
    else:
        assert not torch.allclose(kept.abs(), model.next.weight.detach().abs())
    wide = copy.deepcopy(model).double()
    assert_same_outputs(
        wide, fold_forward(wide, padded=True).model, (torch.randn(2, 3, 9, 9).double(),), rtol=1e-12
    )

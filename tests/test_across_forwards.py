"""Moves across forwards: the BN in a child's forward, its activation in an ancestor's (or the reverse)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import ConvAct, ConvNorm, DenseTail, build, randomize_bn

from bnmove import convert, find_pairs
from bnmove.core.forwards import generated_forward


def _generated(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if generated_forward(m) is not None]


@pytest.mark.parametrize("placement", ["after", "before"])
def test_function_in_the_parent_joins_the_bn_slot(placement: str) -> None:
    """DenseNet's ``F.relu(self.features(x))``: the ReLU joins ``features.1``; only the top forward is regenerated."""
    model, inputs = build("across-function")
    start = (
        model
        if placement == "after"
        else convert(model, "after", method="exact", example_inputs=inputs).model
    )
    other = "before" if placement == "after" else "after"
    result = convert(start, placement, method="exact", example_inputs=inputs)
    (move,) = result.moved
    assert move.pair.placement == other and move.method.startswith("exact")
    assert_same_outputs(model, result.model, inputs)
    assert type(result.model) is DenseTail
    if placement == "after":
        slot = result.model.features[1]
        assert isinstance(slot, nn.Sequential) and isinstance(slot[0], nn.ReLU)
        assert isinstance(slot[1], nn.BatchNorm2d) and move.moved_to == "features.1.1"
        assert _generated(result.model) == [""]  # the Sequential keeps torch's forward
        assert any("regenerated" in note for note in move.notes)
    (pair,) = [p for p in find_pairs(result.model, inputs) if p.placement]
    assert pair.placement == placement


def test_shared_module_called_twice_by_the_parent() -> None:
    model, inputs = build("across-shared-module")
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert sorted(m.moved_to for m in result.moved) == ["conv1.bn.1", "conv2.bn.1"]
    assert result.model.conv1.bn[0] is result.model.act is result.model.conv2.bn[0]
    assert _generated(result.model) == [""]
    assert type(result.model.conv1).forward is ConvNorm.forward and "forward" not in vars(result.model.conv1)
    assert_same_outputs(model, result.model, inputs)
    # The converted model trains and survives pickling and deep copies with its generated forward.
    for again in (pickle.loads(pickle.dumps(result.model)), copy.deepcopy(result.model)):
        assert_same_outputs(model, again, inputs)
    result.model.train()(torch.cat([inputs[0]] * 2)).sum().backward()


def test_activation_in_the_child_bn_in_the_parent() -> None:
    """``self.bn(self.block(x))`` where ``block`` ends in ``F.silu``: the child's forward loses the call."""
    model, inputs = build("across-child-activation")
    result = convert(model, "before", method="exact", example_inputs=inputs)
    (move,) = result.moved
    assert move.moved_to == "bn.0" and isinstance(result.model.bn[1], nn.SiLU)
    assert _generated(result.model) == ["block"]
    assert type(result.model.block) is ConvAct
    assert_same_outputs(model, result.model, inputs)


def test_hooks_on_the_moved_bn_still_fire() -> None:
    model, inputs = build("across-function")
    seen: list[tuple[int, ...]] = []
    model.features[1].register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    result = convert(model, "after", method="exact", example_inputs=inputs)
    seen.clear()
    result.model(*inputs)
    assert seen == [(2, 6, 8, 8)]


def test_a_forward_branching_on_a_float_argument_is_specialised_to_its_calls() -> None:
    """``if drop_rate:``: the forward is traced with the value its parent passes (0.2), guarded at every
    call, in eval and in training mode (its dropout stays)."""
    model, inputs = build("branching-forward")
    assert all(p.movable and p.exact for p in find_pairs(model, inputs) if p.placement)
    result = convert(model, "after", method="exact", example_inputs=inputs)
    assert len(result.moved) == 2 and _generated(result.model) == ["block"]
    assert_same_outputs(model, result.model, inputs)
    forward = generated_forward(result.model.block)
    assert forward is not None and forward.specialised == {"drop_rate": 0.2}
    assert sorted(sorted(key) for key, _ in forward.variants) == [[], ["self.training"]]
    with pytest.raises(AssertionError, match=r"drop_rate has been specialized to have value 0\.2"):
        result.model.block(torch.randn(2, 3, 8, 8), drop_rate=0.5)
    # Training mode runs the training graph: dropout zeroes about a fifth of the block's output.
    block_out: list[torch.Tensor] = []
    hook = result.model.block.register_forward_hook(lambda m, i, o: block_out.append(o))
    copy.deepcopy(result.model).train()(torch.randn(8, 3, 8, 8))
    hook.remove()
    assert 0.1 < float((block_out[0] == 0).float().mean()) < 0.3
    # The specialised forward converts back, specialised alike, and the outputs come home.
    back = convert(copy.deepcopy(result.model).eval(), "before", method="exact", example_inputs=inputs)
    assert len(back.moved) == 2 and generated_forward(back.model.block).specialised == {"drop_rate": 0.2}  # type: ignore[union-attr]
    again = pickle.loads(pickle.dumps(back.model))
    assert_same_outputs(model, again, inputs)


class SameWidthDrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.swish = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6), nn.SiLU()

    def forward(self, x: torch.Tensor, drop_rate: float | None = None) -> torch.Tensor:
        y = self.swish(self.bn(self.conv(self.swish(x))))
        return torch.nn.functional.dropout(y, drop_rate, self.training) if drop_rate else y


class TensorRate(nn.Module):
    """The drop rate comes from a tensor: there is no value to specialise the block's forward to."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 6, 1), SameWidthDrop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x), drop_rate=(x.abs().mean() > 100))


def test_a_forward_branching_on_a_tensor_stays_unmovable_in_inspect_and_convert_alike() -> None:
    torch.manual_seed(0)
    model, inputs = randomize_bn(TensorRate()).eval(), (torch.randn(2, 3, 8, 8),)
    pairs = [p for p in find_pairs(model, inputs) if p.placement]
    assert pairs and not any(p.movable for p in pairs)
    reason = pairs[0].reason or ""
    assert "block (SameWidthDrop), which torch.fx cannot trace" in reason and "if drop_rate" in reason
    for method in ("exact", "auto", "swap"):
        result = convert(model, "after", method=method, example_inputs=inputs)
        assert [(m.moved, m.reason) for m in result.moves if m.pair.placement] == [
            (False, p.reason) for p in pairs
        ]


def test_a_forward_that_never_reads_training_is_traced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its train-mode trace would be the eval one: child modules are leaves of the trace."""
    from bnmove.moving import surgery

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.drop = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(torch.relu(self.bn(self.conv(x))))

    class Branching(Plain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv(x)))
            return y * 0.5 if self.training else y

    traced: list[bool] = []
    real = surgery._trace
    monkeypatch.setattr(surgery, "_trace", lambda m, c=None: (traced.append(m.training), real(m, c))[1])
    assert [key for key, _ in surgery.trace_own_forward(Plain())] == [frozenset()]
    assert traced == [False]
    traced.clear()
    graphs = surgery.trace_own_forward(Branching())
    assert traced == [False, True] and len(graphs) == 2  # one graph per mode


def test_installed_forwards_are_read_not_traced_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Converting a converted model back reads the graphs bnmove installed instead of tracing the
    code made from them again (one trace per mode and optional argument saved, per block)."""
    import bnmove.moving.surgery as surgery

    model, inputs = build("resnet")
    after = convert(model, "after", method="exact", example_inputs=inputs).model
    assert _generated(after)
    traced: list[str] = []
    original = surgery._trace

    def recorded(module: nn.Module, *args, **kwargs):  # type: ignore[no-untyped-def]
        traced.append(type(module).__name__)
        assert generated_forward(module) is None
        return original(module, *args, **kwargs)

    monkeypatch.setattr(surgery, "_trace", recorded)
    back = convert(after, "before", method="exact", example_inputs=inputs)
    assert sum(m.moved for m in back.moves) == 4
    assert_same_outputs(model, back.model, inputs)


class _SharedReLUBlock(nn.Module):
    """A ResNet block: one ReLU module called twice, so moving a BN regenerates the block's forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class _ReadsChildSetting(_SharedReLUBlock):
    """A block whose forward reads a setting of a child: blocks of two widths trace differently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        if self.conv1.out_channels > 4:
            y = y * 2.0
        return self.relu(self.bn2(self.conv2(y)) + x)


def test_blocks_that_trace_alike_are_traced_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three blocks alike and one wider, whose forward only calls its children: one trace of a
    block's forward, and every block's BN moves. Blocks whose forward reads a child's width: one
    trace per width, and each computes what it computed."""
    import bnmove.moving.surgery as surgery

    traced: list[int] = []
    original = surgery.trace_own_forward

    def counted(module: nn.Module, *args, **kwargs):  # type: ignore[no-untyped-def]
        traced.append(id(module))
        return original(module, *args, **kwargs)

    monkeypatch.setattr(surgery, "trace_own_forward", counted)
    torch.manual_seed(0)
    model = randomize_bn(
        nn.Sequential(*(_SharedReLUBlock(4) for _ in range(3)), nn.Conv2d(4, 6, 1), _SharedReLUBlock(6))
    ).eval()
    x = torch.randn(2, 4, 6, 6)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert len(traced) == 1
    assert sorted(m.pair.bn for m in result.moves if m.moved) == ["0.bn1", "1.bn1", "2.bn1", "4.bn1"]
    assert sorted(_generated(result.model)) == ["0", "1", "2", "4"]
    assert_same_outputs(model, result.model, (x,))
    traced.clear()
    reading = randomize_bn(
        nn.Sequential(_ReadsChildSetting(4), _ReadsChildSetting(4), nn.Conv2d(4, 6, 1), _ReadsChildSetting(6))
    ).eval()
    result = convert(reading, "after", method="exact", example_inputs=(x,))
    assert len(traced) == 2 and sorted(_generated(result.model)) == ["0", "1", "3"]
    assert_same_outputs(reading, result.model, (x,))


class _ReadsTensors(nn.Module):
    """A block whose regenerated forward reads its own parameter and buffer (``get_attr``), and,
    with ``frozen``, a tensor computed from a layer's buffer outside the graph."""

    def __init__(self, frozen: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.gamma = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.register_buffer("shift", torch.rand(1, 4, 1, 1))
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x))) * self.gamma + self.shift
        if self.frozen:
            y = y + self.inner[1].running_mean.view(1, -1, 1, 1)  # a real tensor: fx freezes it
        return self.relu(self.inner(y)) + x


def test_a_forward_that_reads_its_tensors_scripts_and_one_fx_would_freeze_stays_with_the_reason() -> None:
    torch.manual_seed(0)
    reads, frozen = randomize_bn(_ReadsTensors(False)).eval(), randomize_bn(_ReadsTensors(True)).eval()
    x = torch.randn(2, 4, 6, 6)
    result = convert(reads, "after", method="exact", example_inputs=(x,))
    assert _generated(result.model) == [""] and sum(m.moved for m in result.moves) == 2
    with torch.no_grad():
        result.model.gamma.mul_(2.0)  # the installed forward and its scriptable twin read the current one
        reads.gamma.mul_(2.0)
        scripted = torch.jit.script(copy.deepcopy(result.model))
        torch.testing.assert_close(scripted(x), reads(x), rtol=1e-4, atol=1e-5)
    stays = convert(frozen, "after", method="exact", example_inputs=(x,))
    assert not any(m.moved for m in stays.moves)
    assert all("can only freeze as a constant" in str(m.reason) for m in stays.moves)
    assert_same_outputs(frozen, stays.model, (x,))

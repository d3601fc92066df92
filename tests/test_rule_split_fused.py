"""The split-fused rule: a fused norm+act module (timm's ``BatchNormAct2d``) becomes a plain BN and
its activation, in the slot's new order, so the other rules move it like any pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_outputs
from rules_helpers import rules_used
from torch import nn
from zoo import BatchNormAct2d, build

import bnmove.rules.split_fused as split_fused
from bnmove import convert, find_pairs
from bnmove.analysis.fused import FusedNorm, analyze_fused_norm
from bnmove.core.blocked import Blocked
from bnmove.pipeline.analyse import analyse
from bnmove.rules import SPLIT_FUSED


@pytest.mark.parametrize("method", ["exact", "fit", "swap"])
def test_the_fused_module_splits_and_its_bn_moves(method: str) -> None:
    model, inputs = build("fused")
    result = convert(model, "after", method=method, example_inputs=inputs)
    (move,) = result.moved
    assert move.pair.fused and move.moved_to == "bn1.1"
    slot = result.model.get_submodule("bn1")
    assert isinstance(slot, nn.Sequential) and [type(m) for m in slot] == [nn.ReLU, nn.BatchNorm2d]
    assert set(slot[1].state_dict()) == set(model.bn1.state_dict())  # the fused module's own keys
    assert isinstance(model.bn1, BatchNormAct2d)  # the given model is unchanged
    if method == "exact":
        assert rules_used(result) == {"fold-backward": 1}
        assert_same_outputs(model, result.model, inputs)


def test_a_fused_activation_no_torch_module_computes_stays_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, inputs = build("fused")
    analysis = analyse(model, inputs)
    (site,) = [s for s in analysis.sites if s.pair.placement]
    assert SPLIT_FUSED.match(site) and SPLIT_FUSED.check(site, analysis.contexts[""]).ok
    # an activation function with no module of its own (a custom one's functional form): the check refuses
    monkeypatch.setattr(split_fused, "split_fused", lambda module, fused: None)
    said = "the fused module's activation is a function no torch module computes"
    assert SPLIT_FUSED.check(site, analysis.contexts[""]).reason == said
    (pair,) = [p for p in find_pairs(model, inputs) if p.placement]
    assert not pair.movable and pair.reason == said
    (stays,) = convert(model, "after", method="auto", example_inputs=inputs).moves[:1]
    assert not stays.moved and stays.reason == said


def test_what_a_fused_module_is_comes_back_typed() -> None:
    """The split of a fused module, None for a fused class whose activation is off (a plain BN), or
    a `Blocked` with the reason: a value of its own type, never a string told apart by content."""
    assert isinstance(analyze_fused_norm(BatchNormAct2d(4)), FusedNorm)
    off = BatchNormAct2d(4)
    off.act = nn.Identity()
    assert analyze_fused_norm(off) is None

    class Doubled(nn.BatchNorm2d):  # a BN subclass that computes something else after the norm
        def forward(self, x):  # type: ignore[no-untyped-def]
            y = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
            return torch.cat([y, y], 1)

    blocked = analyze_fused_norm(Doubled(4))
    assert isinstance(blocked, Blocked) and "is not batch_norm followed by an activation" in blocked.reason


def test_fused_modules_that_trace_alike_are_analysed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm repeats a few fused modules dozens of times: the forward reads no width and only calls
    its children, so modules of one class and activation trace alike whatever their width and are
    analysed once (another activation is another analysis); each of them splits and moves."""
    import bnmove.analysis.detect as detect

    traced: list[nn.Module] = []

    def counted(module: nn.Module) -> FusedNorm | Blocked | None:
        traced.append(module)
        return analyze_fused_norm(module)

    monkeypatch.setattr(detect, "analyze_fused_norm", counted)
    torch.manual_seed(0)
    model = nn.Sequential(
        *(m for _ in range(3) for m in (nn.Conv2d(4, 4, 1), BatchNormAct2d(4))),
        nn.Conv2d(4, 6, 1),
        BatchNormAct2d(6),  # another width: the same analysis
        nn.Conv2d(6, 6, 1),
        BatchNormAct2d(6, act_layer=nn.SiLU),  # another activation: another analysis
    ).eval()
    x = torch.randn(2, 4, 5, 5)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.num_features for m in traced] == [4, 6]
    assert isinstance(traced[1].act, nn.SiLU)
    assert rules_used(result) == {"fold-backward": 5}
    assert_same_outputs(model, result.model, (x,))


def test_apply_gives_a_plain_bn_and_an_activation_that_compute_the_fused_module() -> None:
    """SplitFused is a Rule like the others: match, check, apply; its apply changes nothing in the
    model and gives the two modules, which compute what the fused one does."""
    from bnmove.rules import Rule

    model, inputs = build("fused")
    analysis = analyse(model, inputs)
    (site,) = [s for s in analysis.sites if s.pair.placement]
    root = analysis.traced.regions[site.region].root
    fused = root.get_submodule(str(site.bn_node.target)).eval()
    before = {k: v.clone() for k, v in root.state_dict().items()}
    applied = SPLIT_FUSED.apply(root, site, SPLIT_FUSED.check(site, analysis.contexts[""]))
    assert isinstance(SPLIT_FUSED, Rule) and applied.split is not None
    plain, act = applied.split
    assert type(plain) is nn.BatchNorm2d and set(plain.state_dict()) == set(fused.state_dict())
    x = torch.randn(2, fused.num_features, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(act(plain.eval()(x)), fused(x), rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in root.state_dict().items())

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import ZOO, build

from bnmove.core.clone import clone_module


@pytest.mark.parametrize("name", list(ZOO))
def test_clone_matches_deepcopy(name: str) -> None:
    model, inputs = build(name)
    model.register_forward_hook(lambda m, i, o: o * 1.0)  # hooks travel too
    clone, reference = clone_module(model), copy.deepcopy(model)
    assert type(clone) is type(reference)
    assert [n for n, _ in clone.named_modules()] == [n for n, _ in reference.named_modules()]
    for (key, a), b in zip(clone.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
        assert a.data_ptr() != b.data_ptr() or a.numel() == 0, key  # independent storage
    assert len(clone._forward_hooks) == 1
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(*inputs), model.eval()(*inputs))


def test_clone_keeps_ties_and_independence() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(3, 3))
    model[3].weight = model[0].weight
    model.config = {"depth": [1, 2]}  # type: ignore[assignment]
    model.seen = []  # type: ignore[assignment]  # empty containers are the clone's own too
    clone = clone_module(model)
    clone[1].register_forward_hook(lambda m, i, o: o)
    clone.seen.append(1)  # type: ignore[union-attr]
    assert not model[1]._forward_hooks and model.seen == []
    assert all(
        getattr(a, k) is not getattr(b, k)
        for a, b in zip(clone.modules(), model.modules(), strict=True)
        for k in ("_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks", "_modules", "_parameters")
    )
    assert clone[0] is clone[2] and clone[3].weight is clone[0].weight
    with torch.no_grad():
        clone[0].weight.add_(1.0)
    assert not torch.equal(clone[0].weight, model[0].weight)
    clone.config["depth"].append(3)  # type: ignore[union-attr]
    assert model.config == {"depth": [1, 2]}


def test_a_regenerated_forward_is_installed_again_on_the_clone() -> None:
    """A forward bnmove installed is made again for the clone: it reads the clone's layers (not the
    original's), keeps its graph, scripts, and computes the same."""
    from bnmove import convert
    from bnmove.core.forwards import generated_forward

    model, inputs = build("resnet")
    converted = convert(model, "after", method="exact", example_inputs=inputs).model
    regenerated = [n for n, m in converted.named_modules() if generated_forward(m) is not None]
    assert regenerated
    clone = clone_module(converted)
    for name in regenerated:
        mine, theirs = clone.get_submodule(name), converted.get_submodule(name)
        graph_module = mine.__dict__["forward"].__self__
        assert graph_module is not theirs.__dict__["forward"].__self__
        assert graph_module.module._modules is mine._modules  # the clone's own layers
        assert graph_module.code == theirs.__dict__["forward"].__self__.code
    with torch.no_grad():
        clone.get_submodule(regenerated[0]).get_submodule("conv1").weight.mul_(2.0)
        changed = clone(*inputs)
        torch.testing.assert_close(converted(*inputs), model(*inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed, model(*inputs))
    scripted = torch.jit.script(clone_module(converted))
    with torch.no_grad():
        torch.testing.assert_close(scripted(*inputs), converted(*inputs))


def test_a_graph_module_copy_runs_its_code_and_recompiles_on_its_own() -> None:
    """A GraphModule is copied without compiling its code again: the copy computes the same, saves,
    loads and deep-copies, and an edit and recompile of the copy's graph leaves the original as it was."""
    import io

    from bnmove.core.affine import ChannelAffine

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    traced = torch.fx.symbolic_trace(model)
    holder = nn.Sequential(traced, ChannelAffine(3))
    x = torch.randn(4, 3)
    clone = clone_module(holder)
    assert type(clone[0]) is not type(traced) and clone[0].forward.__func__ is traced.forward.__func__
    torch.testing.assert_close(clone(x), holder(x))
    buffer = io.BytesIO()
    torch.save(clone, buffer)  # pickling recompiles the copy (GraphModule.__reduce__)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(clone), clone):
        torch.testing.assert_close(again(x), holder(x))
    graph_before = str(traced.graph)
    (relu,) = [n for n in clone[0].graph.nodes if n.op == "call_module" and n.target == "1"]
    with clone[0].graph.inserting_after(relu):
        doubled = clone[0].graph.call_function(torch.mul, (relu, 2.0))
    relu.replace_all_uses_with(doubled)
    doubled.args = (relu, 2.0)
    clone[0].recompile()
    torch.testing.assert_close(clone[0](x), 2 * traced(x))
    torch.testing.assert_close(traced(x), model(x))  # the original's code and graph are its own
    assert str(traced.graph) == graph_before

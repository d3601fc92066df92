"""GraphModules built from graphs alike compile their code once (bnmove.core.graph_code)."""

from __future__ import annotations

import io
import operator

import torch
from torch import fx, nn

from bnmove.core import graph_code
from bnmove.core.affine import ChannelAffine
from bnmove.core.graph_code import SharedCodeModule, fingerprint


class _Block(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale


def _built(block: nn.Module) -> SharedCodeModule:
    graph = fx.Graph()  # as bnmove's graphs are: made, not traced (no code fields of a traced forward)
    graph.output(graph.graph_copy(fx.symbolic_trace(block).graph, {}))
    for node in graph.nodes:
        node.type = None  # this file's annotations are strings, which fx cannot import when pickling
    return SharedCodeModule(block, graph)


def test_modules_of_one_graph_share_their_code_and_others_do_not() -> None:
    x = torch.randn(2, 3)
    first, second = _built(_Block(2.0)), _built(_Block(2.0))
    assert type(first).forward is type(second).forward  # compiled once
    torch.testing.assert_close(second(x), torch.relu(second.fc(x)) * 2.0)  # with its own layer
    other = _built(_Block(-0.0))  # a constant written otherwise: its own code
    assert type(other).forward is not type(first).forward and "-0.0" in other.code
    assert fingerprint(_built(_Block(0.0)).graph) != fingerprint(other.graph)


def test_a_shared_module_recompiles_saves_and_copies_as_a_graph_module_of_its_own() -> None:
    x = torch.randn(2, 3)
    first, second = _built(_Block(2.0)), _built(_Block(2.0))
    (mul,) = [n for n in second.graph.nodes if n.target is operator.mul]
    mul.args = (mul.args[0], 3.0)
    second.recompile()  # torch's own: the edit shows in this module alone
    torch.testing.assert_close(second(x), torch.relu(second.fc(x)) * 3.0)
    torch.testing.assert_close(first(x), torch.relu(first.fc(x)) * 2.0)
    buffer = io.BytesIO()
    torch.save(first, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded).__mro__[1] is fx.GraphModule  # a plain GraphModule once loaded
    torch.testing.assert_close(loaded(x), first(x))


def test_every_kept_affine_takes_the_same_code() -> None:
    a, b = ChannelAffine(3), ChannelAffine(5)
    assert type(a).forward is type(b).forward and isinstance(a, ChannelAffine)
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        b.weight.fill_(2.0)
        b.bias.fill_(1.0)
    torch.testing.assert_close(b(x), 2 * x + 1)


def test_a_graph_with_a_constant_that_is_not_plain_is_compiled_its_own_way() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.contains, (frozenset({1, 2}), x)))
    assert fingerprint(graph) is None
    before = len(graph_code._CODE)
    module = SharedCodeModule(nn.Module(), graph)
    assert len(graph_code._CODE) == before and module(2) is True and module(3) is False

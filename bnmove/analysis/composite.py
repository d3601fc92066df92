"""Activations written out in code, recognised as one activation: ``x * torch.sigmoid(x)`` is SiLU.

Model code often spells an activation as a few elementwise operations:
``x * torch.sigmoid(x)`` (SiLU), ``x * F.relu6(x + 3) / 6`` (hardswish),
``x * torch.tanh(F.softplus(x))`` (Mish), ``0.5 * x * (1 + torch.tanh(...))``
(GELU's tanh approximation). `collapse_composites` finds each cone of
elementwise calls that reads one tensor and nothing else (constants aside),
evaluates it on a grid of values, and when it computes a known activation
replaces the cone by one call of torch's function for it (equal to float
rounding). The pass is deterministic, so the analysis graph and the graph of
a forward that is regenerated collapse alike.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .patterns import known_function

#: elementwise functions and tensor methods a composite may be made of
_FUNCTIONS = {
    operator.mul, operator.truediv, operator.add, operator.sub, operator.neg, operator.pow,
    torch.mul, torch.div, torch.add, torch.sub, torch.pow, torch.neg, torch.exp, torch.erf,
    torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.clip, torch.square, torch.sqrt,
    F.relu, F.relu6, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.hardsigmoid,
}  # fmt: skip
_METHODS = {
    "mul", "div", "add", "sub", "neg", "pow", "exp", "erf", "sigmoid", "tanh", "relu", "clamp", "clip",
    "square", "sqrt", "__mul__", "__rmul__", "__truediv__", "__add__", "__radd__", "__sub__", "__rsub__",
    "__neg__", "__pow__",
}  # fmt: skip
_MAX_CONE = 16
_GRID = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)


def _elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FUNCTIONS
    return node.op == "call_method" and node.target in _METHODS


def _is_clamp(node: fx.Node) -> bool:
    """``x.clamp(min=0)`` alone is a ReLU, ``torch.clamp(x, 0, 6)`` a ReLU6."""
    return node.target in (torch.clamp, torch.clip, "clamp", "clip")


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def _cone(out: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """The elementwise calls ending at ``out`` that read one node and constants, with that node."""
    cone: set[fx.Node] = set()
    sources: set[fx.Node] = set()
    stack = [out]
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        if not _elementwise(node) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            sources.add(node)
            continue
        cone.add(node)
        if len(cone) > _MAX_CONE:
            return None
        stack.extend(_node_inputs(node))
    # Grow only through calls, and keep the cone closed: every inner value is read inside it.
    if len(sources) != 1 or (len(cone) < 2 and not _is_clamp(out)):
        return None
    if any(u not in cone for node in cone if node is not out for u in node.users):
        return None
    (source,) = sources
    order = [n for n in out.graph.nodes if n in cone]
    return order, source


def _evaluate(nodes: list[fx.Node], source: fx.Node) -> torch.Tensor | None:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {source: graph.placeholder("x")}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[nodes[-1]])
    try:
        with torch.no_grad():
            out = fx.GraphModule(torch.nn.Module(), graph)(_GRID.clone())
    except Exception:
        return None
    return out.double() if isinstance(out, torch.Tensor) and out.shape == _GRID.shape else None


def collapse_composites(graph: fx.Graph) -> int:
    """Replace every composite activation in ``graph`` by one call; returns how many."""
    count = 0
    for out in reversed(list(graph.nodes)):
        if out.graph is not graph or not _elementwise(out):
            continue  # erased by an earlier collapse, or not a candidate
        found = _cone(out)
        if found is None:
            continue
        nodes, source = found
        values = _evaluate(nodes, source)
        known = known_function(values, _GRID) if values is not None else None
        if known is None:
            continue
        _, fn, kwargs = known
        with graph.inserting_before(out):
            call: fx.Node = graph.call_function(fn, (source,), dict(kwargs))
        call.meta.update({k: v for k, v in out.meta.items() if k == "nn_module_stack"})
        out.replace_all_uses_with(call)
        for node in reversed(nodes):
            graph.erase_node(node)
        count += 1
    return count


__all__ = ["collapse_composites"]

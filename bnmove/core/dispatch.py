"""A forward of several graphs that torch alone rebuilds: the dispatch is a GraphModule too.

A forward that branches on ``self.training`` or on an optional argument left at ``None`` is
regenerated as one graph per branch (``bnmove.moving.surgery.trace_own_forward``), each the
forward of its own `torch.fx.GraphModule` (see `bnmove.core.forwards`). Choosing between them at
each call is control flow, which a GraphModule cannot keep as such: torch rebuilds a loaded
GraphModule by tracing its code again, and tracing runs an ``if`` once. So the choice is written
as data flow over the dispatcher's inputs, which tracing records as it is::

    def forward(self, module_, graphs_, is_none_, x, shortcut = None):
        getattr_1 = module_.training
        call = is_none_.__call__(shortcut, None)
        mul = call * 2
        add = getattr_1 + mul
        getitem = graphs[add]
        return getitem.__call__(x, shortcut)

and the module's forward is ``functools.partial(dispatcher.forward, module, graphs, operator.is_)``:
``graphs`` is a tuple with one entry per combination of mode and arguments left at ``None`` (each
the bound forward of the graph that runs for it), and ``operator.is_`` is passed in, not called
by name, because tracing cannot record ``x is None`` but records a call of an input. Everything
in it is torch's or the standard library's, so the model saved whole loads without bnmove.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx, nn

from .graph_code import SharedCodeModule

#: in a variant's key: the graph of training mode (the forward branches on ``self.training``)
TRAINING = "self.training"
#: the key of the dispatcher's ``meta`` that says which entry of ``graphs`` holds each variant
_DISPATCH = "dispatched variants"


def choose(keys: Sequence[frozenset[str]], training: bool, nones: frozenset[str]) -> int:
    """Which variant runs in this mode with these optional arguments left at None.

    ``keys[0]`` is the general graph (eval mode, every argument as given); a mode or argument
    that no variant names runs the general graph of the mode."""
    position = {key: i for i, key in enumerate(keys)}
    chosen, key = 0, frozenset[str]()
    named = frozenset().union(*keys)
    if TRAINING in named and training:
        key = frozenset({TRAINING})
        chosen = position.get(key, chosen)
    optional = nones & (named - {TRAINING})
    if optional:
        key = key | optional
        chosen = position.get(key, chosen)
    return chosen


def _switches(keys: Sequence[frozenset[str]]) -> tuple[bool, list[str]]:
    named = frozenset().union(*keys)
    return TRAINING in named, sorted(named - {TRAINING})


#: the dispatcher's own inputs, before the forward's
_OWN_INPUTS = ("module_", "graphs_", "is_none_")


def can_dispatch(graph: fx.Graph) -> bool:
    """Whether a dispatcher can pass a call on to this graph: every input is a named argument
    (a ``*args`` or ``**kwargs`` forward cannot be passed on without unpacking, which fx cannot
    write), none named like the dispatcher's own."""
    names = [str(n.target) for n in graph.nodes if n.op == "placeholder"]
    return not any(name.startswith("*") or name in _OWN_INPUTS for name in names)


def dispatcher(
    module: nn.Module, variants: Sequence[tuple[frozenset[str], fx.GraphModule]], class_name: str
) -> Callable[..., Any]:
    """The forward that runs, at each call, the variant of the module's mode and arguments.

    ``variants[0]`` is the general graph's GraphModule; their inputs are alike (one signature)."""
    keys = [key for key, _ in variants]
    training, optional = _switches(keys)
    graph = fx.Graph()
    owner, graphs, is_ = (graph.placeholder(name) for name in _OWN_INPUTS)
    inputs = [  # the forward's own arguments, with their defaults
        graph.placeholder(str(n.target), default_value=n.args[0])
        if n.args
        else graph.placeholder(str(n.target))
        for n in variants[0][1].graph.nodes
        if n.op == "placeholder"
    ]
    by_name = {node.target: node for node in inputs}
    index: Any = graph.call_function(getattr, (owner, "training")) if training else 0
    for bit, name in enumerate(optional, start=int(training)):
        is_none = graph.call_method("__call__", (is_, by_name[name], None))
        term = graph.call_function(operator.mul, (is_none, 1 << bit))
        index = term if isinstance(index, int) else graph.call_function(operator.add, (index, term))
    chosen = graph.call_function(operator.getitem, (graphs, index))
    graph.output(graph.call_method("__call__", (chosen, *inputs)))
    graph.lint()
    dispatch = SharedCodeModule(nn.Module(), graph, class_name=class_name)
    table: list[Any] = []  # bound forwards of the variants' GraphModules
    for i in range(1 << (int(training) + len(optional))):
        nones = frozenset(name for bit, name in enumerate(optional, start=int(training)) if i >> bit & 1)
        table.append(variants[choose(keys, bool(training and i & 1), nones)][1].forward)
    dispatch.meta[_DISPATCH] = [
        (sorted(key), next(i for i, fn in enumerate(table) if fn.__self__ is gm)) for key, gm in variants
    ]
    return functools.partial(dispatch.forward, module, tuple(table), operator.is_)


def dispatched(module: nn.Module) -> list[tuple[frozenset[str], fx.GraphModule]] | None:
    """The variants (key, GraphModule) of the forward `dispatcher` made for ``module``, or None."""
    forward = module.__dict__.get("forward")
    if not isinstance(forward, functools.partial) or len(forward.args) != 3 or forward.args[0] is not module:
        return None
    dispatch = getattr(forward.func, "__self__", None)
    if not isinstance(dispatch, fx.GraphModule) or _DISPATCH not in dispatch.meta:
        return None
    table = forward.args[1]
    return [(frozenset(key), table[i].__self__) for key, i in dispatch.meta[_DISPATCH]]

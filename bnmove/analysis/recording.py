"""Record one forward pass as an fx graph: analysis for code torch.fx cannot trace.

``symbolic_trace`` fails on real code in predictable ways (padding computed
from the input's shape, ``if mask is not None``, loops over ``torch.split``,
shape checks). Running the model once on an example input and recording what
happens needs none of that: module hooks record every call of a leaf module
(BatchNorms, activations, torch's own layers), a ``TorchFunctionMode`` records
every torch function and tensor method called outside them, and tensor
identity links the calls. The result is an ``fx.Graph`` of the same shape
``BnTracer`` produces (``call_module``/``call_function``/``call_method`` nodes
with ``nn_module_stack`` metadata), specialised to the example's shapes. It is
used to decide what moves, never run: the user's own code keeps deciding shapes.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..core.running import eval_mode
from .composite import collapse_composites
from .patterns import recognise
from .tracing import is_leaf


class _Recorder(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
        # Decided before recording starts: recognising a module may run it on a probe.
        recognise(model)
        self.leaves = {id(m) for m in model.modules() if is_leaf(m)}
        self.attrs = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())}
        self.producers: dict[int, fx.Node] = {}
        self.alive: list[Any] = []  # keeps recorded tensors alive, so their ids stay unique
        self.stack: list[tuple[nn.Module, bool]] = []  # (module, inside a leaf)
        self.pending: list[tuple[Any, ...]] = []
        self.constants = 0

    # -- tensors <-> nodes ---------------------------------------------------------------
    def node_for(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            if isinstance(value, (list, tuple)):
                return type(value)(self.node_for(v) for v in value)
            return value
        node = self.producers.get(id(value))
        if node is None:
            name = self.attrs.get(id(value))
            if name is not None:
                node = self.graph.get_attr(name)
            else:  # a tensor made outside the graph's view (a constant, a cached buffer)
                node = self.graph.placeholder(f"constant_{self.constants}")
                self.constants += 1
            self.remember(value, node)
        return node

    def remember(self, value: Any, node: fx.Node) -> None:
        if isinstance(value, torch.Tensor):
            self.producers[id(value)] = node
            self.alive.append(value)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    self.remember(item, self.graph.call_function(operator.getitem, (node, i)))

    def module_stack(self, leaf: nn.Module | None = None) -> OrderedDict[str, tuple[str, type]]:
        modules = [m for m, _ in self.stack] + ([leaf] if leaf is not None else [])
        out: OrderedDict[str, tuple[str, type]] = OrderedDict()
        for m in modules:
            name = self.names.get(id(m))
            if name:
                out[name] = (name, type(m))
        return out

    @property
    def inside_leaf(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    # -- hooks ----------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.inside_leaf:
            self.stack.append((module, True))
            return
        leaf = id(module) in self.leaves and id(module) in self.names
        if leaf:
            self.pending.append(tuple(self.node_for(a) for a in args))
        self.stack.append((module, leaf))

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        _, leaf = self.stack.pop()
        if not leaf or self.inside_leaf:
            return
        node_args = self.pending.pop()
        node = self.graph.call_module(self.names[id(module)], node_args)
        node.meta["nn_module_stack"] = self.module_stack(module)
        self.remember(output, node)

    # -- torch functions and tensor methods -------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_leaf:
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        first = args[0] if args else None
        mutates = isinstance(first, torch.Tensor) and (out is first or out is None)
        if not outputs and not mutates:
            return out  # sizes, dtypes, comparisons to Python values: not part of the data flow
        name = getattr(func, "__name__", "")
        node_args = tuple(self.node_for(a) for a in args)
        node_kwargs = {k: self.node_for(v) for k, v in kwargs.items()}
        if name and getattr(torch.Tensor, name, None) is func:
            node = self.graph.call_method(name, node_args, node_kwargs)
        else:
            node = self.graph.call_function(func, node_args, node_kwargs)
        node.meta["nn_module_stack"] = self.module_stack()
        if mutates:
            self.remember(first, node)
        elif out is not None:
            self.remember(out, node)
        return out


def record_graph(model: nn.Module, inputs: Sequence[Any]) -> fx.Graph:
    """Run ``model(*inputs)`` once (eval mode, no grad) and return the graph of what it called.

    The caller passes a copy it may change: running a forward can fill caches.
    Raises whatever the model's forward raises.
    """
    recorder = _Recorder(model)
    flat_inputs = tree_flatten(list(inputs))[0]
    for i, value in enumerate(flat_inputs):
        if isinstance(value, torch.Tensor):
            recorder.remember(value, recorder.graph.placeholder(f"input_{i}"))
    handles = [
        nn.modules.module.register_module_forward_pre_hook(recorder.pre_hook),
        nn.modules.module.register_module_forward_hook(recorder.post_hook),
    ]
    try:
        with eval_mode(model), torch.no_grad(), recorder:
            output = model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    leaves = [recorder.node_for(t) for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
    recorder.graph.output(tuple(leaves))
    collapse_composites(recorder.graph)
    return recorder.graph


__all__ = ["record_graph"]

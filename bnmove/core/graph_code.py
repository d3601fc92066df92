"""GraphModules that compile the code of a graph once per process, however many are built from it.

A conversion builds many GraphModules from graphs alike: every kept affine has the same graph, and
blocks that trace alike (resnet50's Bottlenecks) get regenerated forwards, and scriptable twins,
whose code is the same text. A GraphModule generates its code from its graph and compiles it when
it is built, which is most of what building one costs. `SharedCodeModule` does that once per
graph *fingerprint* (every node's operation, name, target, arguments and annotation: what the
code is written from) and hands the compiled forward to the next one built from a graph with the
same fingerprint. Only the first compilation is shared; every later ``recompile`` (after an edit
of the graph, when pickled) is torch's own, and the module pickles and deep-copies as a plain
GraphModule, which torch alone loads.
"""

from __future__ import annotations

import collections
import types
from typing import Any

import torch
from torch import fx
from torch.fx.experimental import _config as fx_config
from torch.fx.graph import CodeGen, PythonCode

#: fingerprint -> (the PythonCode of the first module built from it, its compiled forward)
_CODE: collections.OrderedDict[tuple[Any, ...], tuple[PythonCode, Any]] = collections.OrderedDict()
_LIMIT = 1024


class _Unkeyable(Exception):
    pass


def _key(value: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(value, fx.Node):
        return ("node", index[value])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_key(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), _key(v, index)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _key(value.start, index), _key(value.stop, index), _key(value.step, index))
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value).__name__, repr(value))  # repr: -0.0 and 0.0 are written apart
    if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ("torch", repr(value))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return ("object", value)  # a function or a class: written by name, compared by identity
    raise _Unkeyable


def fingerprint(graph: fx.Graph) -> tuple[Any, ...] | None:
    """What ``graph``'s code is written from, or None where it is not plain to read (a codegen of
    its own, a constant that is not a plain value)."""
    if type(graph._codegen) is not CodeGen:
        return None
    index: dict[fx.Node, int] = {}
    # where a traced forward's code object says it comes from (its file and first line)
    parts: list[Any] = [tuple(sorted(getattr(graph, "_co_fields", {}).items()))]
    try:
        for i, node in enumerate(graph.nodes):
            index[node] = i
            parts.append(
                (
                    node.op,
                    node.name,
                    _key(node.target, index),
                    _key(node.args, index),
                    _key(node.kwargs, index),
                    repr(node.type),
                )
            )
    except _Unkeyable:
        return None
    return tuple(parts)


class SharedCodeModule(fx.GraphModule):
    """A GraphModule whose first compilation takes the code of an earlier one built from a graph
    with the same `fingerprint` (see the module's docstring)."""

    def recompile(self) -> PythonCode:
        cls = type(self)  # fx makes a class per instance
        if "_compiled" in vars(cls):
            return super().recompile()
        cls._compiled = True  # type: ignore[attr-defined]  # on the class fx makes for this instance
        # (code written for the profiler is named after the module: not shared)
        key = None if fx_config.enrich_profiler_metadata else fingerprint(self._graph)
        hit = None if key is None else _CODE.get(key)
        if hit is None:
            python_code = super().recompile()
            if key is not None:
                _CODE[key] = (python_code, cls.forward)
                if len(_CODE) > _LIMIT:
                    _CODE.popitem(last=False)
            return python_code
        python_code, forward = hit
        self._code = python_code.src
        self._lineno_map = python_code._lineno_map
        self._prologue_start = python_code._prologue_start
        cls.forward = forward
        return python_code

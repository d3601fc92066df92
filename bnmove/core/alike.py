"""Which modules' own forwards trace alike, read from the forward's code.

A conversion traces the own forward of every block whose pair it moves (children as leaves), and
analyses every fused norm+activation module; modules that trace alike share one trace.
`bnmove.core.modules.structure` calls two modules alike when their classes and settings are equal
all the way down, so ResNet-50's 16 bottlenecks traced 8 times and efficientnet_b0's 49
``BatchNormAct2d`` were analysed 15 times: their channel counts differ. Yet a forward that does
nothing with a child but call it (or test it against None) cannot see the child's settings:
children are leaves of the trace, and calling a leaf makes the same node whatever the leaf holds.
Nor can a forward see an own setting it never reads.

`forward_key` reads which attributes of ``self`` the forward's code touches, and how, and keys a
module by its class, the own settings and tensors it reads (their values; for a tensor, whether it
is None) and which of the children it calls are there. Any other use of ``self`` (passing it or a
child on, indexing or iterating a child, calling the module's own methods or properties,
``super()``, assigning) and any source that cannot be read fall back to ``structure``.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import weakref
from collections.abc import Hashable
from typing import Any

from torch import nn

from .modules import structure

_SCALAR = (bool, int, float, str, type(None))
_MISSING = object()

#: what each class's forward does with ``self``, read once (weakly: fx makes a class per GraphModule)
_USES: weakref.WeakKeyDictionary[type, dict[str, frozenset[str]] | None] = weakref.WeakKeyDictionary()


def _plain(value: object) -> bool:
    return isinstance(value, _SCALAR) or (
        isinstance(value, tuple) and all(isinstance(v, _SCALAR) for v in value)
    )


def _tests_none(outer: ast.AST | None, attribute: ast.Attribute) -> bool:
    """``self.x is None`` or ``self.x is not None`` (either side)."""
    if not isinstance(outer, ast.Compare) or len(outer.comparators) != 1:
        return False
    if not isinstance(outer.ops[0], (ast.Is, ast.IsNot)):
        return False
    other = outer.comparators[0] if outer.left is attribute else outer.left
    return isinstance(other, ast.Constant) and other.value is None


def self_uses(cls: type) -> dict[str, frozenset[str]] | None:
    """Each attribute of ``self`` that ``cls.forward`` touches, with how: ``"call"`` (``self.x(…)``),
    ``"none"`` (``self.x is None``) or ``"read"`` (anything else done with ``self.x``); None when
    the code does anything with ``self`` but touch an attribute, or cannot be read."""
    if cls in _USES:
        return _USES[cls]
    _USES[cls] = found = _read_uses(cls)
    return found


def _read_uses(cls: type) -> dict[str, frozenset[str]] | None:
    forward = inspect.getattr_static(cls, "forward", None)
    if not inspect.isfunction(forward) or forward is nn.Module.forward:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    function = tree.body[0] if tree.body else None
    if not isinstance(function, ast.FunctionDef) or not function.args.args or function.decorator_list:
        return None  # (a decorator's wrapper runs code this source does not show)
    me = function.args.args[0].arg
    parents = {child: node for node in ast.walk(function) for child in ast.iter_child_nodes(node)}
    uses: dict[str, set[str]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id == "super":
            return None  # a parent's forward, read elsewhere
        if not isinstance(node, ast.Name) or node.id != me:
            continue
        attribute = parents.get(node)
        if not isinstance(node.ctx, ast.Load) or not isinstance(attribute, ast.Attribute):
            return None  # self rebound, passed on, or compared
        if not isinstance(attribute.ctx, ast.Load):
            return None  # the forward sets an attribute of its module
        outer = parents.get(attribute)
        if isinstance(outer, ast.Call) and outer.func is attribute:
            how = "call"
        elif _tests_none(outer, attribute):
            how = "none"
        else:
            how = "read"
        uses.setdefault(attribute.attr, set()).add(how)
    return {name: frozenset(hows) for name, hows in uses.items()}


def forward_key(module: nn.Module, *, child_settings: bool = False) -> Hashable | None:
    """Equal for two modules whose own forward traces alike (children as leaves); None where no
    key says so (a forward bnmove installed on the instance is its own).

    ``child_settings``: the settings of the children called count too, all the way down (what a
    caller reads of the children themselves: the fused-norm analysis reads which activation its
    child is); else only whether each child called is there."""
    if "forward" in module.__dict__:
        return None
    uses = self_uses(type(module))
    if uses is None:
        return structure(module)
    parts: list[tuple[Any, ...]] = []
    for name, hows in sorted(uses.items()):
        if name == "training":
            continue  # the mode: traced in each where the forward reads it
        if name in module._modules:
            if hows - {"call", "none"}:
                return structure(module)  # the child is read, not only called
            child = module._modules[name]
            alike = None if child is None else (structure(child) if child_settings else True)
            if child is not None and alike is None:
                return None
            parts.append(("child", name, alike))
        elif name in module._parameters or name in module._buffers:
            value = module._parameters[name] if name in module._parameters else module._buffers[name]
            parts.append(("tensor", name, value is None))
        elif name in module.__dict__:
            value = module.__dict__[name]
            if not _plain(value) or ("call" in hows and value is not None):
                return structure(module)  # (None: a child left out, called behind a test)
            parts.append(("setting", name, type(value), value))  # True and 1 are not alike here
        else:
            value = inspect.getattr_static(type(module), name, _MISSING)
            if value is _MISSING or not _plain(value):
                return structure(module)  # a method, a property, or something only __getattr__ knows
            # a class constant: the same for every instance of the class
    return ("forward", type(module), tuple(parts))


__all__ = ["forward_key", "self_uses"]

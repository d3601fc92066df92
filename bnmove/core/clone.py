"""A faster ``copy.deepcopy`` for module trees.

``copy.deepcopy`` rebuilds every module through ``__reduce_ex__`` and deep-copies
each of its dozen (almost always empty) hook dictionaries one by one; on a
450-module CNN that costs a third of a forward pass. This walks the tree
directly with the same memo semantics (shared parameters and modules stay
shared, so tied weights stay tied): immutable attributes are shared, empty
containers recreated, and everything else goes through ``copy.deepcopy``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict as _OrderedDict
from typing import Any, TypeVar

import torch
from torch import nn

from .forwards import INSTALLED, install_forward, installed_graphs

M = TypeVar("M", bound=nn.Module)

_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), type)


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    if isinstance(value, (dict, list, set)) and not value and type(value) in (dict, list, set, _OrderedDict):
        return type(value)()
    if isinstance(value, tuple) and all(isinstance(v, _IMMUTABLE) for v in value):
        return value
    return copy.deepcopy(value, memo)


def _copy_tensor(t: Any, memo: dict[int, Any]) -> Any:
    key = id(t)
    if key in memo:
        return memo[key]
    if type(t) is nn.Parameter:
        new: Any = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    elif type(t) is torch.Tensor and not t.requires_grad:
        new = t.detach().clone()
    else:  # tensor subclasses, buffers that require grad: let torch decide
        return copy.deepcopy(t, memo)
    memo[key] = new
    return new


def clone_module(module: M, memo: dict[int, Any] | None = None) -> M:
    """An independent copy of ``module``, equivalent to ``copy.deepcopy(module)``."""
    memo = {} if memo is None else memo
    key = id(module)
    if key in memo:
        return memo[key]  # type: ignore[no-any-return]
    cls = type(module)
    if (
        getattr(cls, "__deepcopy__", None) is not None
        or getattr(cls, "__getstate__", None) is not nn.Module.__getstate__
    ):
        return copy.deepcopy(module, memo)  # the class copies itself its own way (e.g. GraphModule)
    new = cls.__new__(cls)
    memo[key] = new
    state: dict[str, Any] = {}
    # a forward bnmove installed is installed again on the copy: three times faster than deep
    # copies of its GraphModules, and the same forward
    installed = installed_graphs(module)
    for name, value in module.__dict__.items():
        if installed is not None and name in INSTALLED:
            continue
        # the dictionaries are memoised too: a regenerated forward reaches the module's layers
        # through a view that holds these very dictionaries (bnmove.core.forwards)
        if name == "_modules":
            state[name] = memo[id(value)] = type(value)()
            state[name].update(
                (k, None if child is None else clone_module(child, memo)) for k, child in value.items()
            )
        elif name in ("_parameters", "_buffers"):
            state[name] = memo[id(value)] = type(value)(
                (k, None if t is None else _copy_tensor(t, memo)) for k, t in value.items()
            )
        else:
            state[name] = _copy_value(value, memo)
    new.__dict__.update(state)
    if installed is not None:
        install_forward(new, *installed)
    return new

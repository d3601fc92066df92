"""Forwards generated from fx graphs and installed on one module instance (its class stays the user's)."""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer


class OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every child module stays a call (a leaf)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


#: in a variant's key: the graph of training mode (the forward branches on ``self.training``)
TRAINING = "self.training"


class GraphForward:
    """A ``forward`` generated from fx graphs, bound to one module instance.

    Stored as the instance attribute ``forward``, so ``nn.Module.__call__``
    (hooks included) runs it while the class stays the user's. It pickles and
    deep-copies with its module (the code is kept as source text).

    A forward that tests optional arguments (``if shortcut is None``) has one
    graph per combination of them left at ``None``; each call runs the one that
    matches its arguments, and a forward that branches on ``self.training`` has
    the graphs of each mode (the key holds :data:`TRAINING`) and runs the one of
    the module's mode (see ``bnmove.moving.surgery.trace_own_forward``). A
    forward specialised to the values it was called with (``if drop_rate:``)
    checks them at each call and refuses another value.
    """

    def __init__(
        self,
        module: nn.Module,
        variants: Sequence[tuple[frozenset[str], fx.Graph]],
        specialised: dict[str, Any] | None = None,
    ) -> None:
        self.variants = list(variants)
        #: arguments the graphs were traced with as constants (their guards check each call)
        self.specialised = dict(specialised or {})
        self._module = module
        self._sources = [self._source_of(graph) for _, graph in self.variants]
        self._compile()

    @staticmethod
    def _source_of(graph: fx.Graph) -> str:
        code = graph.python_code(root_module="self")
        return _format_import_block(code.globals, sys_importer) + "\n" + code.src

    def _compile(self) -> None:
        self._fns = [_forward_from_src(source, {}) for source in self._sources]
        self._fn = self._fns[0]  # the general one: every optional argument as given
        self.__signature__ = _drop_self(inspect.signature(self._fn))
        self._by_nones = {nones: fn for (nones, _), fn in zip(self.variants, self._fns, strict=True)}
        keys = set().union(*(nones for nones, _ in self.variants))
        self._training = TRAINING in keys
        self._optional = sorted(keys - {TRAINING})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._fn
        key: frozenset[str] = frozenset()
        if self._training and self._module.training:
            key = frozenset({TRAINING})
            fn = self._by_nones.get(key, fn)
        if self._optional:
            bound = self.__signature__.bind(*args, **kwargs)
            key = key | {n for n in self._optional if bound.arguments.get(n) is None}
            fn = self._by_nones.get(key, fn)
        return fn(self._module, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "variants": self.variants,
            "_module": self._module,
            "_sources": self._sources,
            "specialised": self.specialised,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"specialised": {}, **state})  # forwards saved by bnmove 0.1 have none
        self._compile()

    def __deepcopy__(self, memo: dict[int, Any]) -> GraphForward:
        new = GraphForward.__new__(GraphForward)
        memo[id(self)] = new
        state = {
            "variants": copy.deepcopy(self.variants, memo),
            "_module": copy.deepcopy(self._module, memo),
            "_sources": self._sources,
            "specialised": copy.deepcopy(self.specialised, memo),
        }
        new.__setstate__(state)
        return new


def _drop_self(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def generated_forward(module: nn.Module) -> GraphForward | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, GraphForward) else None


def install_forward(
    module: nn.Module,
    variants: Sequence[tuple[frozenset[str], fx.Graph]],
    specialised: dict[str, Any] | None = None,
) -> None:
    """Make the graphs the forward of this one instance (its class and everything else stay)."""
    for _, graph in variants:
        graph.lint()
    module.__dict__["forward"] = GraphForward(module, variants, specialised)


@contextlib.contextmanager
def class_forward(module: nn.Module) -> Iterator[None]:
    """While open, ``type(module).forward`` is the instance's generated forward.

    torch.fx traces a root module through its class's ``forward``; a module
    that bnmove rewrote earlier carries its forward on the instance, and
    tracing must see that one (a second conversion, a round trip).
    """
    generated = generated_forward(module)
    if generated is None:
        yield
        return
    original = type(module)
    fn = generated._fn
    temporary = type(original.__name__, (original,), {"forward": fn, "__module__": original.__module__})
    module.__class__ = temporary
    try:
        yield
    finally:
        module.__class__ = original

"""Forwards generated from fx graphs and installed on one module instance (its class stays the user's).

A forward of one graph is installed as the bound ``forward`` of a `torch.fx.GraphModule`
that torch saves as its code, as text, and rebuilds with torch alone: a converted model saved
whole loads and re-saves where bnmove is not installed.

The code reaches the module's layers and tensors through one child, ``module``
(``self.module.conv1(x)``): a plain ``nn.Module`` whose parameter, buffer and child dictionaries
*are* the module's own (a view, not a copy). Pickling and deep-copying keep the dictionaries
shared, so the forward always runs the module's current layers: a layer swapped in later (a new
head, a quantized layer) runs, a device move is followed, and fx tracing of the model sees only
the model's own layers. (A GraphModule made over the module itself would hold its own references
to the layers, which loading and deep-copying keep as they were then.)

TorchScript compiles the code against the module, which has no ``module`` attribute: the module's
``__prepare_scriptable__`` hands it a scriptable twin instead, the same code over the module's own
names (see `_prepare_for_torchscript`), and the module's TorchScript type is keyed by the code, so
that it never compiles the class's forward of an unchanged module of its class in its stead.

A forward that needs several graphs (one per mode of ``self.training``, or per optional argument
left at ``None``) has a GraphModule per graph, and a dispatch between them that is a GraphModule
too (`bnmove.core.dispatch`). Only a forward of that kind that takes ``*args`` or ``**kwargs``
stays a `GraphForward`, and the conversion says that the model needs bnmove to load.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.graph import CodeGen
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.package import sys_importer

from .dispatch import TRAINING, can_dispatch, choose, dispatched, dispatcher
from .graph_code import SharedCodeModule
from .modules import key_script_type


class OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every child module stays a call (a leaf)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


class GraphForward:
    """A ``forward`` generated from fx graphs, bound to one module instance, which only bnmove
    loads: what bnmove 0.1 installed for a forward of several graphs, and what it still installs
    for one that takes ``*args`` or ``**kwargs`` (`bnmove.core.dispatch` cannot pass those on).

    Stored as the instance attribute ``forward``, so ``nn.Module.__call__``
    (hooks included) runs it while the class stays the user's. It pickles and
    deep-copies with its module (the code is kept as source text).

    A forward that tests optional arguments (``if shortcut is None``) has one
    graph per combination of them left at ``None``; each call runs the one that
    matches its arguments, and a forward that branches on ``self.training`` has
    the graphs of each mode (the key holds `TRAINING`) and runs the one of
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
        self._fns = [_compiled(source) for source in self._sources]
        self.__signature__ = _drop_self(inspect.signature(self._fns[0]))
        self._keys = [key for key, _ in self.variants]
        self._optional = sorted(set().union(*self._keys) - {TRAINING})

    def function_for(self, training: bool, nones: frozenset[str] = frozenset()) -> Callable[..., Any]:
        """The graph's function that runs in this mode with these optional arguments left at None."""
        return self._fns[choose(self._keys, training, nones)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nones: frozenset[str] = frozenset()
        if self._optional:
            bound = self.__signature__.bind(*args, **kwargs)
            nones = frozenset(n for n in self._optional if bound.arguments.get(n) is None)
        return self.function_for(self._module.training, nones)(self._module, *args, **kwargs)

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


@functools.lru_cache(maxsize=512)
def _compiled(source: str) -> Callable[..., Any]:
    """The function of a generated forward's source (with its imports): one per source text, which
    blocks that trace alike share, and which analysing a converted model reads again and again."""
    return _forward_from_src(source, {})  # type: ignore[no-any-return]


def _drop_self(sig: inspect.Signature) -> inspect.Signature:
    return sig.replace(parameters=list(sig.parameters.values())[1:])


@dataclass(frozen=True)
class InstalledForward:
    """What bnmove installed as a module's forward, whichever form it took.

    Its graphs are read (copied, over the module's own names) only when asked for: most readers
    want its specialised arguments or its signature."""

    #: makes the graphs, one per mode and optional arguments left at None (see `variants`)
    graphs: Callable[[], list[tuple[frozenset[str], fx.Graph]]]
    #: arguments the graphs were traced with as constants (their guards check each call)
    specialised: dict[str, Any]
    #: the function of the graph for a mode and the optional arguments left at None
    function_for: Callable[[bool, frozenset[str]], Callable[..., Any]]
    #: the forward's signature, ``self`` first
    signature: inspect.Signature

    @functools.cached_property
    def variants(self) -> list[tuple[frozenset[str], fx.Graph]]:
        """The graphs, each a copy of its own (key, graph)."""
        return self.graphs()

    @property
    def function(self) -> Callable[..., Any]:
        """The forward as a function of ``(self, *args)`` (the general graph's)."""
        return self.function_for(False, frozenset())


#: the key of a forward GraphModule's ``meta`` that holds the arguments it was specialised to
_SPECIALISED = "specialised"
#: the forward GraphModule's child through which its code reaches the module's own layers
_VIEW = "module"
_STATE = ("_parameters", "_buffers", "_modules")  # what attribute lookup reads
#: the instance attribute through which `torch.jit.script` swaps in a module's scriptable twin
_PREPARE = "__prepare_scriptable__"
#: why `torch.jit.script` refuses a module whose forward dispatches between graphs
_NOT_SCRIPTABLE = (
    "this module's forward was regenerated as one graph per mode or optional argument, chosen at "
    "each call, which TorchScript cannot compile: script the original model, or use torch.export"
)


def _view_of(module: nn.Module) -> nn.Module:
    """A plain module whose parameters, buffers and children are ``module``'s own dictionaries."""
    view = nn.Module()
    for key in _STATE:
        view.__dict__[key] = module.__dict__[key]
    return view


def _is_view_of(candidate: object, module: nn.Module) -> bool:
    return isinstance(candidate, nn.Module) and all(
        candidate.__dict__.get(key) is module.__dict__.get(key) for key in _STATE
    )


def _retarget(graph: fx.Graph, prefix: str, strip: bool) -> fx.Graph:
    """A copy of ``graph`` whose module and attribute targets gain (or lose) ``prefix.``."""
    new = copy_graph(graph)
    for node in new.nodes:
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            node.target = target.removeprefix(f"{prefix}.") if strip else f"{prefix}.{target}"
    return new


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that pickles without naming the tracer that made it."""
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    new._tracer_cls = None  # bnmove's tracer would be named in the pickle; torch's rebuilds it
    return new


def generated_forward(module: nn.Module) -> InstalledForward | None:
    """The forward bnmove installed on this instance, or None when it runs its class's."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, GraphForward):
        return InstalledForward(
            lambda: [(key, copy_graph(graph)) for key, graph in forward.variants],
            forward.specialised,
            forward.function_for,
            inspect.signature(forward._fns[0]),
        )
    modules = _installed_modules(module)
    if modules is None:
        graph_module = _bound_graph_module(module)
        if graph_module is None or not _names_resolve(graph_module.graph, module):
            return None
        modules, strip = [(frozenset(), graph_module)], False  # a scriptable twin's, over own names
    else:
        strip = True
    keys = [key for key, _ in modules]
    variants = functools.cache(
        lambda: [
            (key, _retarget(gm.graph, _VIEW, strip=True) if strip else copy_graph(gm.graph))
            for key, gm in modules
        ]
    )
    # compiled when first asked for (most readers want the graph): generating its source is most
    # of the cost of reading a converted block
    compiled = [functools.cache(lambda i=i: _function_of(variants()[i][1])) for i in range(len(modules))]
    return InstalledForward(
        lambda: [(key, copy_graph(graph)) for key, graph in variants()],
        dict(modules[0][1].meta.get(_SPECIALISED, {})),
        lambda training, nones: compiled[choose(keys, training, nones)](),
        inspect.signature(type(modules[0][1]).forward),
    )


def _function_of(graph: fx.Graph) -> Callable[..., Any]:
    return _compiled(GraphForward._source_of(graph))


def _installed_modules(module: nn.Module) -> list[tuple[frozenset[str], fx.GraphModule]] | None:
    """The GraphModules over ``module``'s view of the forward bnmove installed on it (one graph, or
    several and their dispatch), with their keys; None for any other forward."""
    modules = dispatched(module)
    if modules is None:
        graph_module = _bound_graph_module(module)
        modules = None if graph_module is None else [(frozenset(), graph_module)]
    if modules is None or not all(_is_view_of(gm._modules.get(_VIEW), module) for _, gm in modules):
        return None
    return modules


def _bound_graph_module(module: nn.Module) -> fx.GraphModule | None:
    """The GraphModule whose bound ``forward`` the instance carries, if it carries one."""
    forward = module.__dict__.get("forward")
    graph_module = getattr(forward, "__self__", None)
    if isinstance(forward, types.MethodType) and isinstance(graph_module, fx.GraphModule):
        return graph_module
    return None


def _names_resolve(graph: fx.Graph, module: nn.Module) -> bool:
    """Whether every layer and attribute ``graph`` reads is one of ``module``'s own."""
    try:
        for node in graph.nodes:
            if node.op == "call_module":
                module.get_submodule(str(node.target))
            elif node.op == "get_attr":
                _attribute(module, str(node.target))
    except AttributeError:
        return False
    return True


def _attribute(module: nn.Module, target: str) -> object:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner), name)


def install_forward(
    module: nn.Module,
    variants: Sequence[tuple[frozenset[str], fx.Graph]],
    specialised: dict[str, Any] | None = None,
) -> bool:
    """Make the graphs the forward of this one instance (its class and everything else stay); the
    graphs become the module's (the caller reads them no more).

    Returns whether torch alone can rebuild it: one graph is a GraphModule's forward, several
    are dispatched by a GraphModule (`bnmove.core.dispatch`); only a forward of several graphs
    that takes ``*args`` or ``**kwargs`` is a `GraphForward`, which needs bnmove to load.
    """
    for _, graph in variants:
        graph.lint()
    module.__dict__.pop(_PREPARE, None)  # a twin of an earlier forward must never be scripted
    name = type(module).__name__
    if len(variants) > 1 and not can_dispatch(variants[0][1]):
        module.__dict__["forward"] = GraphForward(module, variants, specialised)
        return False
    view = _view_of(module)
    modules = [(key, _over_view(view, graph, f"{name}Forward", specialised, key)) for key, graph in variants]
    # else TorchScript would compile the class's forward of an unchanged module of its class instead
    key_script_type(module, "generated forward", "\n".join(gm.code for _, gm in modules))
    if len(modules) > 1:
        module.__dict__["forward"] = dispatcher(module, modules, f"{name}Dispatch")
        if not hasattr(type(module), _PREPARE):  # TorchScript says why, in torch's words alone
            module.__dict__[_PREPARE] = functools.partial(torch._assert, False, _NOT_SCRIPTABLE)
        return True
    module.__dict__["forward"] = modules[0][1].forward
    _prepare_for_torchscript(module, variants[0][1])
    return True


def _over_view(
    view: nn.Module,
    graph: fx.Graph,
    class_name: str,
    specialised: dict[str, Any] | None,
    dispatched_on: frozenset[str] = frozenset(),
) -> fx.GraphModule:
    """A GraphModule of ``graph`` whose code reaches the module's layers through ``view``.

    The graph of an optional argument left at None checks that it is (fx's ``_assert_is_none``),
    which torch cannot load again (its retrace looks the check up by its dotted name); the
    dispatch runs that graph only when the argument is None, so the check goes."""
    retargeted = _retarget(graph, _VIEW, strip=False)
    for node in list(retargeted.nodes):
        if node.target is _assert_is_none and getattr(node.args[0], "target", None) in dispatched_on:
            retargeted.erase_node(node)
    holder = nn.Module()
    holder.add_module(_VIEW, view)
    graph_module = SharedCodeModule(holder, retargeted, class_name=class_name)
    graph_module.add_module(_VIEW, view)  # the view itself, not the copy of its layers fx made
    graph_module.meta[_SPECIALISED] = dict(specialised or {})
    return graph_module


def _prepare_for_torchscript(module: nn.Module, graph: fx.Graph) -> None:
    """Let ``torch.jit.script`` compile this module's generated forward.

    TorchScript compiles the source of ``module.forward`` against the module, and the source of the
    installed forward reaches the layers through the view (``self.module.conv1``), which the module
    has not. Before scripting, TorchScript asks every module for ``__prepare_scriptable__()`` and
    scripts what it returns in the module's place (also in its parent's children). The module gets
    that attribute: ``functools.partial(operator.getitem, (twin,), 0)``, which the standard
    library alone pickles and which returns the module's *twin* when called: an instance
    of its class with the module's own attribute dictionaries (parameters, buffers, children, hooks:
    shared, not copied) whose forward is the same graph over the module's own names
    (``self.conv1``). The twin pickles and deep-copies with the module, its dictionaries still
    the module's, and loads with torch alone; its forward's own GraphModule holds a table of the
    layers, taken anew when the model is loaded or deep-copied (the converting guide says what
    that means for a layer replaced after that). A class that defines ``__prepare_scriptable__``
    itself keeps its own.
    """
    if hasattr(type(module), _PREPARE):
        return
    # the graph is `install_forward`'s to give: a copy only where it is not yet as `copy_graph` makes one
    plain = type(graph._codegen) is CodeGen and graph._tracer_cls is None
    direct = SharedCodeModule(
        _stubs(graph, module),
        graph if plain else copy_graph(graph),
        class_name=f"{type(module).__name__}Script",
    )
    twin = type(module).__new__(type(module))
    twin.__dict__.update(module.__dict__)
    for key in _STATE:  # its code reads the module's current layers (fx copied the ones it saw)
        direct.__dict__[key] = module.__dict__[key]
    twin.__dict__["forward"] = direct.forward
    module.__dict__[_PREPARE] = functools.partial(operator.getitem, (twin,), 0)  # () -> twin


def _stubs(graph: fx.Graph, module: nn.Module) -> nn.Module:
    """A root with a plain module at every layer ``graph`` calls, and ``module``'s own value at
    every attribute it reads: a GraphModule made over it has the graph's code and none of the
    module's layers (the twin's GraphModule takes the module's own dictionaries right after), so
    it never recompiles a GraphModule layer (a kept affine), as a GraphModule does its GraphModule
    children whenever it compiles."""
    root = nn.Module()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        owner = root
        *path, name = str(node.target).split(".")
        for part in path:
            if not isinstance(getattr(owner, part, None), nn.Module):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if node.op == "call_module":
            if not isinstance(getattr(owner, name, None), nn.Module):
                owner.add_module(name, nn.Module())
        elif not hasattr(owner, name):
            setattr(owner, name, _attribute(module, str(node.target)))
    return root


@contextlib.contextmanager
def class_forward(module: nn.Module, nones: frozenset[str] = frozenset()) -> Iterator[None]:
    """While open, ``type(module).forward`` is the instance's generated forward.

    torch.fx traces a root module through its class's ``forward``; a module
    that bnmove rewrote earlier carries its forward on the instance, and
    tracing must see that one (a second conversion, a round trip): the graph of
    the module's mode, with the optional arguments ``nones`` left at None.
    """
    generated = generated_forward(module)
    if generated is None:
        yield
        return
    original = type(module)
    fn = generated.function_for(module.training, nones)
    temporary = type(original.__name__, (original,), {"forward": fn, "__module__": original.__module__})
    module.__class__ = temporary
    try:
        yield
    finally:
        module.__class__ = original

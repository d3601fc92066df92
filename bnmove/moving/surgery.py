"""Install a move in the smallest scope that holds it, so the user's model stays the user's model.

Two ways, tried in this order:

* **Module surgery** (BN and activation are modules, each called once): no
  ``forward`` changes. Inside a stock ``nn.Sequential`` the two children swap
  places in the order (names and state-dict keys stay). Elsewhere the BN's slot
  becomes ``nn.Sequential(act, bn)`` (before -> after: ``<bn>.0`` is the
  activation, ``<bn>.1`` the BN) or ``nn.Sequential(bn, act)`` (after -> before:
  ``<bn>.0`` the BN, ``<bn>.1`` the activation), and the activation's slot
  becomes ``nn.Identity``. An exact move that keeps the BN's affine map puts
  it in the same slot: ``Sequential(affine, act, bn)`` or
  ``Sequential(bn, act, affine)``. Hooks stay on the same module objects.
* **Graph surgery of one forward**: where the activation is a function or a
  method call, or a module called at several places, the module whose own
  ``forward`` calls both (its children kept whole) is traced, the nodes are
  reordered, and the generated code is installed as that instance's
  ``forward`` (the bound forward of a ``torch.fx.GraphModule`` over the instance, see
  `bnmove.core.forwards`). The instance keeps its class, attributes,
  properties and hooks; every other module keeps its code.
"""

from __future__ import annotations

import inspect
import itertools
import re
import weakref
from collections import Counter, OrderedDict
from typing import Any

from torch import fx, nn

from ..analysis.composite import collapse_composites
from ..analysis.nodes import is_link_module
from ..core.forwards import (  # GraphForward: see __all__
    TRAINING,
    GraphForward,
    OwnForwardTracer,
    class_forward,
    generated_forward,
)
from ..core.modules import Slots, key_script_type, parent_of, submodule
from ..core.running import kept_modes

# -- module surgery ---------------------------------------------------------------------------


def sequential_neighbours(
    root: nn.Module,
    first: str,
    second: str,
    positions: dict[int, tuple[list[str], dict[str, int]]] | None = None,
) -> nn.Sequential | None:
    """The stock ``nn.Sequential`` holding ``first`` then ``second`` (only links between), or None.

    ``positions`` keeps each Sequential's child keys and their positions across calls, while no
    Sequential changes (a long Sequential would otherwise be read again for every pair).
    """
    parent_a, a = parent_of(root, first)
    parent_b, b = parent_of(root, second)
    if parent_a is not parent_b or not isinstance(parent_a, nn.Sequential):
        return None
    if type(parent_a).forward is not nn.Sequential.forward:
        return None
    cache = positions if positions is not None else {}
    if id(parent_a) not in cache:
        keys = list(parent_a._modules)
        cache[id(parent_a)] = (keys, {k: n for n, k in enumerate(keys)})
    keys, where = cache[id(parent_a)]
    i, j = where[a], where[b]
    if j <= i or not all(is_link_module(parent_a._modules[k]) for k in keys[i + 1 : j]):
        return None
    return parent_a


class Reorders:
    """Pending reorders of Sequential children, applied in one pass per Sequential.

    Rebuilding a Sequential's ordered dict per move made converting a long
    Sequential quadratic; the moves are collected as key lists (C-level list
    operations) and each Sequential is rebuilt once.
    """

    def __init__(self) -> None:
        self._orders: dict[int, tuple[nn.Sequential, list[str]]] = {}

    def move(self, seq: nn.Sequential, key: str, anchor: str, after: bool) -> None:
        """Put child ``key`` right after (or right before) child ``anchor``."""
        _, keys = self._orders.setdefault(id(seq), (seq, list(seq._modules)))
        keys.remove(key)
        keys.insert(keys.index(anchor) + (1 if after else 0), key)

    def apply(self) -> None:
        for seq, keys in self._orders.values():
            children = seq._modules
            seq._modules = OrderedDict((k, children[k]) for k in keys)
            key_script_type(seq, "module order", ",".join(keys))  # else it scripts as the old order
        self._orders.clear()


def add_beside(root: nn.Module, name: str, suffix: str, module: nn.Module) -> str:
    """Register ``module`` beside submodule ``name`` as ``<leaf>_<suffix>`` (made unique); returns its name."""
    parent_name, _, leaf = name.rpartition(".")
    parent = submodule(root, parent_name) if parent_name else root
    new, i = f"{leaf}_{suffix}", 1
    while new in parent._modules or hasattr(parent, new):
        i += 1
        new = f"{leaf}_{suffix}{i}"
    parent.add_module(new, module)
    return f"{parent_name}.{new}" if parent_name else new


def module_move(
    root: nn.Module,
    bn: str,
    act: str | None,
    act_module: nn.Module,
    placement: str,
    reorders: Reorders,
    affine: nn.Module | None = None,
    positions: dict[int, tuple[list[str], dict[str, int]]] | None = None,
    slots: Slots | None = None,
) -> str:
    """Move BN ``bn`` across activation ``act`` by replacing module slots; returns the BN's new name.

    ``placement`` is the pair's current placement. ``act`` is None for a fused
    norm+activation module, whose slot becomes ``Sequential(act, bn)``;
    ``act_module`` is the activation to call (the fused module's own). Swaps
    inside a Sequential wait in ``reorders`` until ``reorders.apply()``. A
    kept ``affine`` joins the BN's slot: ``Sequential(affine, act, bn)`` (to
    after) or ``Sequential(bn, act, affine)`` (to before). ``positions`` is
    `sequential_neighbours`' cache: slot replacements keep every Sequential's keys, and the
    reorders wait, so it stays valid until ``reorders.apply()``. ``slots`` is the index of every
    module's slots under ``root``, read once per conversion (without it, the model is walked).
    """
    replace_everywhere = (slots or Slots(root)).replace
    bn_module = submodule(root, bn)
    if affine is not None:  # X -> A -> f -> BN' or BN' -> f -> A -> N, all in the BN's slot
        if act is not None:
            replace_everywhere(submodule(root, act), nn.Identity())
        three = (affine, act_module, bn_module) if placement == "before" else (bn_module, act_module, affine)
        replace_everywhere(bn_module, nn.Sequential(*three))
        return f"{bn}.2" if placement == "before" else f"{bn}.0"
    if act is not None:
        first, second = (bn, act) if placement == "before" else (act, bn)
        seq = sequential_neighbours(root, first, second, positions)
        if seq is not None:
            bn_key, act_key = bn.rpartition(".")[2], act.rpartition(".")[2]
            if placement == "before":
                reorders.move(seq, bn_key, act_key, after=True)
            else:
                reorders.move(seq, bn_key, act_key, after=False)
            return bn
        replace_everywhere(submodule(root, act), nn.Identity())
    pair = (act_module, bn_module) if placement == "before" else (bn_module, act_module)
    replace_everywhere(bn_module, nn.Sequential(*pair))
    return f"{bn}.1" if placement == "before" else f"{bn}.0"


# -- graph surgery of one forward -----------------------------------------------------------------


def owner(node: fx.Node, prefix: str = "") -> str:
    """Qualified name of the module whose own ``forward`` makes this call (``""`` for the root).

    ``prefix`` is the traced region's own name; nodes without a recorded stack belong to it.
    """
    stack = node.meta.get("nn_module_stack")
    names = [name for name, _ in stack.values()] if stack else []
    if node.op == "call_module" and names and names[-1] == str(node.target):
        names = names[:-1]
    local = names[-1] if names else ""
    return ".".join(part for part in (prefix, local) if part)


def node_key(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, Any]:
    """What identifies a call within one forward: its kind and target (a module by identity,
    since a shared module has one name per path)."""
    if node.op == "call_module":
        return node.op, id(modules.get(str(node.target)))
    return node.op, node.target


def keyed_calls(nodes: list[fx.Node], modules: dict[str, nn.Module]) -> dict[tuple[Any, ...], fx.Node]:
    """Calls of one forward by (kind, target, occurrence), the same in every trace of that forward."""
    seen: Counter[tuple[str, Any]] = Counter()
    out: dict[tuple[Any, ...], fx.Node] = {}
    for node in nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        key = node_key(node, modules)
        out[(*key, seen[key])] = node
        seen[key] += 1
    return out


def _trace(module: nn.Module, concrete: dict[str, Any] | None = None) -> fx.Graph:
    nones = frozenset(name for name, value in (concrete or {}).items() if value is None)
    with class_forward(module, nones):
        graph = OwnForwardTracer().trace(module, concrete_args=concrete or None)
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("_tensor_constant"):
            # a tensor computed outside the graph (``self.layer[1].running_mean.view(…)`` on a
            # real tensor, ``torch.tensor([…])``): fx freezes it on the traced module, which a
            # forward kept as code cannot hold
            raise ValueError(
                f"forward of {type(module).__name__} computes a tensor fx can only freeze as a constant"
            )
        if isinstance(node.type, str):
            node.type = None
        if node.op == "placeholder" and concrete:
            # fx names a concrete argument's parameter ``rate_1``; callers pass ``rate=``
            base = re.sub(r"_\d+$", "", str(node.target))
            if base != node.target and base in concrete:
                node.target = base
    collapse_composites(graph)  # as in the analysis graph, so the calls match
    return graph


#: classes already read by `_reads_training` (weakly: fx makes a class per GraphModule)
_READS_TRAINING: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _reads_training(cls: type) -> bool:
    """Whether any method ``cls`` defines (or inherits from a class below ``nn.Module``) mentions
    ``training``: only such a forward can trace differently in train mode (child modules are
    leaves of the trace, so their own reading of it never reaches the graph). Where a source
    cannot be read, assume it does."""
    if cls not in _READS_TRAINING:
        _READS_TRAINING[cls] = _mentions_training(cls)
    return _READS_TRAINING[cls]


def _mentions_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for member in vars(klass).values():
            function = getattr(member, "__func__", member)
            if not inspect.isfunction(function):
                continue
            try:
                source = inspect.getsource(function)
            except (OSError, TypeError):
                return True
            if re.search(r"\btraining\b", source):
                return True
    return False


def trace_own_forward(
    module: nn.Module, specialise: dict[str, Any] | None = None
) -> list[tuple[frozenset[str], fx.Graph]]:
    """The graphs of ``module``'s own forward: one, or one per mode and combination of optional arguments.

    fx passes a Proxy for ``shortcut=None``, so ``if shortcut is None`` takes
    the branch for a given argument. When the forward reads its optional
    (``None``-default) arguments differently once they are left at ``None``,
    each combination is traced with them concrete; the combinations must make
    the same calls (only what they read may differ), so a move is the same
    move in each. A forward that branches on ``self.training`` (drop paths,
    stochastic depth) is traced in each mode, its training graphs keyed with
    `TRAINING`. ``specialise`` fixes arguments to
    the values the forward is called with (``if drop_rate:`` on a float):
    the graphs assert them at every call (fx's guard), so another value fails
    loudly instead of running a forward traced for something else. Raises
    ``ValueError`` with the reason for code that cannot be kept this way:
    optional arguments that change which calls are made, more than three
    optional arguments.
    """
    generated = generated_forward(module)
    if generated is not None and specialise is None:
        # bnmove's own graphs, one per mode and optional argument where they differ: tracing the
        # code made from them again gives them back, at the cost of a trace per variant
        return generated.variants  # copies of their own
    concrete = dict(specialise if specialise is not None else generated.specialised if generated else {})
    optional = [
        name
        for name, default in _optional_arguments(module).items()
        if default is None and name not in concrete
    ]
    if len(optional) > 3:
        raise ValueError(f"forward of {type(module).__name__} has more than three optional arguments")
    variants: list[tuple[frozenset[str], fx.Graph]] = []
    with kept_modes(module):
        module.training = False
        general = trained = _trace(module, concrete)
        modes = [False]
        if generated is not None or _reads_training(type(module)):  # else both modes trace alike
            module.training = True
            trained = _trace(module, concrete)
            if general.python_code("self").src != trained.python_code("self").src:
                modes.append(True)
        for mode in modes:
            module.training = mode
            variants.extend(
                _optional_variants(module, trained if mode else general, concrete, optional, mode)
            )
    return variants


def _optional_variants(
    module: nn.Module, general: fx.Graph, concrete: dict[str, Any], optional: list[str], training: bool
) -> list[tuple[frozenset[str], fx.Graph]]:
    """The general graph of one mode, and one per combination of optional arguments left at None
    where the forward reads them otherwise."""
    mode = frozenset({TRAINING}) if training else frozenset[str]()
    variants = [(mode, general)]
    calls = _calls(general)
    for r in range(1, len(optional) + 1):
        for nones in itertools.combinations(optional, r):
            graph = _trace(module, {**concrete, **dict.fromkeys(nones)})
            mine = _calls(graph)
            if [c[:2] for c in mine] != [c[:2] for c in calls]:
                names = ", ".join(f"`{name}`" for name in nones)
                raise ValueError(
                    f"forward of {type(module).__name__} makes other calls when {names} is not given"
                )
            if mine != calls:
                variants.append((frozenset(nones) | mode, graph))
    return variants


def _optional_arguments(module: nn.Module) -> dict[str, Any]:
    """Parameters of the forward that have a default, with it."""
    generated = generated_forward(module)
    try:
        signature = generated.signature if generated else inspect.signature(type(module).forward)
        params = signature.parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def _calls(graph: fx.Graph) -> list[tuple[Any, ...]]:
    """The calls a graph makes and what each reads, without the checks fx adds for concrete arguments."""
    calls = [
        n
        for n in graph.nodes
        if n.op in ("call_module", "call_function", "call_method") and "assert" not in str(n.target)
    ]
    index = {node: i for i, node in enumerate(calls)}

    def read(value: Any) -> str:
        if isinstance(value, fx.Node):
            return (
                f"input {value.target}" if value.op == "placeholder" else f"call {index.get(value, value.op)}"
            )
        return repr(value)

    return [
        (
            n.op,
            str(n.target),
            tuple(read(a) for a in n.args),
            tuple((k, read(v)) for k, v in n.kwargs.items()),
        )
        for n in calls
    ]


__all__ = [
    "GraphForward",  # models converted by bnmove 0.1 and saved whole pickle their forward under this name
    "Reorders",
    "add_beside",
    "keyed_calls",
    "module_move",
    "owner",
    "sequential_neighbours",
    "trace_own_forward",
]

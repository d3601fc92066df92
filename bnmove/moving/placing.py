"""Where each move happens: the smallest scope that holds it, and the move made there.

Per pair, in this order: module surgery (BN and activation are modules, the
activation called once: slots change, no forward does), else graph surgery of
the one forward that calls both (traced with its children whole, nodes
reordered in each of its graphs, installed on that instance). A pair that fits
neither is reported with the reason. See `bnmove.moving.surgery` for the
operations themselves.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx.proxy import TraceError

from ..analysis.detect import Site
from ..analysis.nodes import input_is_shared
from ..analysis.tracing import Region
from ..core.alike import forward_key
from ..core.blocked import Blocked
from ..core.forwards import copy_graph, generated_forward, install_forward
from ..core.modules import Slots, first_line, qualified, set_submodule, submodule
from ..core.running import untouched
from ..rules import SPLIT_FUSED, Context
from ..rules.split_fused import activation_module
from . import rewrite, surgery


@dataclass(frozen=True)
class _ModuleSurgery:
    """Move by replacing module slots: no forward changes."""

    act_module: nn.Module
    #: also reorder the analysis graph (the modules swap places inside a Sequential)
    reorder: bool


@dataclass(frozen=True)
class _GraphSurgery:
    """Move by reordering nodes in the forward of module ``scope`` (in each of its graphs)."""

    scope: str
    #: the pair's (BN, activation) nodes in each graph of that forward
    nodes: list[tuple[fx.Node, fx.Node]]


@dataclass(frozen=True)
class _CrossSurgery:
    """BN and activation are called from two forwards (a child's and an ancestor's): the activation
    joins the BN's slot (``Sequential(act, bn)`` / ``Sequential(bn, act)``) and the forward that
    called it, ``scope``, is regenerated without that call."""

    act_module: nn.Module
    scope: str
    #: the activation's node in each graph of that forward
    nodes: list[fx.Node]


#: how one pair moves: slots replaced, one forward regenerated, or both
Structure = _ModuleSurgery | _GraphSurgery | _CrossSurgery
#: a scope's own forward traced: its graphs (one per variant), and in each its calls by key
_ScopeGraph = tuple[list[tuple[frozenset[str], fx.Graph]], list[dict[tuple[Any, ...], fx.Node]]]


class Mover:
    """Decides, per pair, the smallest scope that holds its move, and makes the move there.

    The analysis graph is kept a faithful description of the converted model
    (calibration replays it), so graph moves are made in it too.
    """

    def __init__(self, work: nn.Module, regions: dict[str, Region]) -> None:
        self.work = work
        self.regions = regions
        self._modules: dict[str, dict[str, nn.Module]] = {}
        self._calls: dict[str, Counter[int]] = {}
        self._keys: dict[str, dict[fx.Node, tuple[str, tuple[Any, ...]]]] = {}
        self._scopes: dict[str, _ScopeGraph | Blocked] = {}
        self._dirty: set[str] = set()
        #: the argument values a scope's forward was specialised to (it branches on them)
        self._specialised: dict[str, dict[str, Any]] = {}
        self._reorders = surgery.Reorders()
        #: child positions of each Sequential, read once: moves replace slots and reorders wait for
        #: install(), so the keys stay as they were until then
        self._positions: dict[int, tuple[list[str], dict[str, int]]] = {}
        #: every module's slots in each region, read once (a replaced module's slots are looked up here)
        self._slots: dict[str, Slots] = {}
        #: the graphs of the own forward of each key of blocks that trace alike, as traced (copies are edited)
        self._traced_like: dict[Hashable, list[tuple[frozenset[str], fx.Graph]]] = {}

    def slots(self, region: str) -> Slots:
        if region not in self._slots:
            self._slots[region] = Slots(self.regions[region].root)
        return self._slots[region]

    def forget(self, region: str) -> None:
        """Read the region's modules again: one was replaced (a kept affine absorbed)."""
        self._modules.pop(region, None)
        self._calls.pop(region, None)

    def modules(self, region: str) -> dict[str, nn.Module]:
        if region not in self._modules:
            self._modules[region] = dict(self.regions[region].root.named_modules())
        return self._modules[region]

    def _module_calls(self, region: str) -> Counter[int]:
        if region not in self._calls:
            modules = self.modules(region)
            self._calls[region] = Counter(
                id(modules[str(n.target)])
                for n in self.regions[region].graph.nodes
                if n.op == "call_module" and str(n.target) in modules
            )
        return self._calls[region]

    def _node_keys(self, region: str) -> dict[fx.Node, tuple[str, tuple[Any, ...]]]:
        """Each call's (owner, key) in the pristine analysis graph, computed before any move."""
        if region not in self._keys:
            by_owner: dict[str, list[fx.Node]] = {}
            for node in self.regions[region].graph.nodes:
                by_owner.setdefault(surgery.owner(node, region), []).append(node)
            keys: dict[fx.Node, tuple[str, tuple[Any, ...]]] = {}
            modules = self.modules(region)
            for scope, nodes in by_owner.items():
                for key, node in surgery.keyed_calls(nodes, modules).items():
                    keys[node] = (scope, key)
            self._keys[region] = keys
        return self._keys[region]

    def structure(self, site: Site, context: Context) -> Structure | Blocked:
        """How this pair moves, or why it cannot (``context``: what checks read of its region)."""
        modules = self.modules(site.region)
        root = self.regions[site.region].root
        if SPLIT_FUSED.match(site):
            checked = SPLIT_FUSED.check(site, context)
            if checked.reason is not None:
                return Blocked(checked.reason)
            return _ModuleSurgery(SPLIT_FUSED.split(root, site)[1], reorder=False)
        assert site.act_node is not None
        bn, act = site.bn_node, site.act_node
        calls = self._module_calls(site.region)
        if bn.op == "call_module" and act.op == "call_module" and calls[id(modules[str(act.target)])] == 1:
            first, second = (bn, act) if site.pair.placement == "before" else (act, bn)
            reorder = (
                surgery.sequential_neighbours(root, str(first.target), str(second.target), self._positions)
                is not None
            )
            return _ModuleSurgery(modules[str(act.target)], reorder)
        keys = self._node_keys(site.region)
        (bn_scope, bn_key), (act_scope, act_key) = keys[bn], keys[act]
        if bn_scope != act_scope:
            return self._across(site, act_scope, act_key)
        local = self._scope_graph(bn_scope)
        if isinstance(local, Blocked):
            return local
        nodes = []
        for calls_by_key in local[1]:
            local_bn, local_act = calls_by_key.get(bn_key), calls_by_key.get(act_key)
            if local_bn is None or local_act is None:
                return Blocked(
                    f"the pair could not be found again in the forward of {bn_scope or 'the model'}"
                )
            nodes.append((local_bn, local_act))
        return _GraphSurgery(bn_scope, nodes)

    def _across(self, site: Site, act_scope: str, act_key: tuple[Any, ...]) -> _CrossSurgery | Blocked:
        """The move of a BN called in one forward next to an activation called in another."""
        bn, act = site.bn_node, site.act_node
        assert act is not None
        if bn.op != "call_module":
            return Blocked("the functional batch_norm and its activation are called in two forwards")
        act_module: nn.Module | None
        if act.op == "call_module":
            act_module = self.modules(site.region)[str(act.target)]
        elif any(isinstance(a, fx.Node) for a in (*act.args[1:], *act.kwargs.values())):
            return Blocked(
                "the activation takes tensor arguments and is called in another forward than the BN"
            )
        else:
            act_module = activation_module(
                str(site.pair.activation_kind), act.target, tuple(act.args[1:]), dict(act.kwargs)
            )
            if act_module is None:
                return Blocked(
                    f"the activation ({site.pair.activation}) is called in another forward than the BN and "
                    "no torch module computes it, so it cannot join the BN's slot"
                )
        local = self._scope_graph(act_scope)
        if isinstance(local, Blocked):
            return local
        nodes = [calls_by_key.get(act_key) for calls_by_key in local[1]]
        if any(node is None for node in nodes):
            return Blocked(
                f"the activation could not be found again in the forward of {act_scope or 'the model'}"
            )
        return _CrossSurgery(act_module, act_scope, [n for n in nodes if n is not None])

    def _scope_graph(self, scope: str) -> _ScopeGraph | Blocked:
        if scope not in self._scopes:
            module = submodule(self.work, scope) if scope else self.work
            what = f"{scope or 'the model'} ({type(module).__name__})"
            self._scopes[scope] = Blocked(f"the forward of {what} is being traced")  # never asks for itself
            try:
                with untouched(module):
                    try:
                        variants = self._own_forward(module)
                        earlier = generated_forward(module)  # a forward bnmove specialised before stays so
                        if earlier is not None and earlier.specialised:
                            self._specialised[scope] = earlier.specialised
                    except TraceError:  # Python control flow on an argument: specialise to the calls
                        values = self._call_values(scope)
                        if not values:
                            raise
                        variants = surgery.trace_own_forward(module, specialise=values)
                        self._specialised[scope] = values
                local = dict(module.named_modules())
                self._scopes[scope] = (
                    variants,
                    [surgery.keyed_calls(list(graph.nodes), local) for _, graph in variants],
                )
            except Exception as exc:
                self._scopes[scope] = Blocked(
                    f"the move needs a rewrite of the forward of {what}, which torch.fx cannot trace "
                    f"({first_line(exc)})"
                )
        return self._scopes[scope]

    def _own_forward(self, module: nn.Module) -> list[tuple[frozenset[str], fx.Graph]]:
        """`surgery.trace_own_forward`, traced once for the blocks that trace alike
        (`bnmove.core.alike.forward_key`: ResNet-50's 16 bottlenecks trace twice, with and without a
        downsample). A module with a forward of its own (bnmove's, installed earlier) has no key:
        its graphs are its own."""
        like = forward_key(module)
        if like is None:
            return surgery.trace_own_forward(module)
        if like not in self._traced_like:
            self._traced_like[like] = surgery.trace_own_forward(module)
        return [(key, copy_graph(graph)) for key, graph in self._traced_like[like]]

    def _call_values(self, scope: str) -> dict[str, Any] | None:
        """The non-tensor arguments every call of ``scope`` passes (the same at each call), read in the
        forward of the nearest ancestor that calls it; None when there is no such single set."""
        module = submodule(self.work, scope)
        generated = generated_forward(module)
        try:
            signature = generated.signature if generated else inspect.signature(type(module).forward)
        except (TypeError, ValueError):
            return None
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])  # without self
        parts = scope.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            ancestor, child = ".".join(parts[:cut]), ".".join(parts[cut:])
            traced = self._scope_graph(ancestor)
            if isinstance(traced, Blocked):
                continue
            calls = [n for _, g in traced[0] for n in g.nodes if n.op == "call_module" and n.target == child]
            if not calls:
                continue
            found: list[dict[str, Any]] = []
            for node in calls:
                try:
                    bound = signature.bind(*node.args, **node.kwargs)
                except TypeError:
                    return None
                found.append({k: v for k, v in bound.arguments.items() if not _holds_node(v)})
            return found[0] if all(f == found[0] for f in found) else None
        return None

    def apply(self, site: Site, how: Structure, affine: nn.Module | None = None) -> tuple[list[str], str]:
        """Make the structural move (placing ``affine``, the kept affine layer, when given);
        returns notes and the BN's qualified name afterwards."""
        assert site.pair.placement is not None
        modules = self.modules(site.region)
        root = self.regions[site.region].root
        placement = site.pair.placement
        bn_name = str(site.bn_node.target)
        if isinstance(how, _ModuleSurgery):
            notes: list[str] = []
            act_name = str(site.act_node.target) if site.act_node is not None and site.fused is None else None
            if (
                placement == "before"
                and input_is_shared(site.bn_node, modules)
                and getattr(how.act_module, "inplace", False)
            ):
                how.act_module.inplace = False  # type: ignore[assignment]
                notes.append("activation made out-of-place: its new input has other readers")
            act_module = how.act_module
            if site.fused is not None:  # split after the parameters moved: the plain BN copies them
                plain, act_module = SPLIT_FUSED.split(root, site)
                set_submodule(root, bn_name, plain)
            new_name = surgery.module_move(
                root,
                bn_name,
                act_name,
                act_module,
                placement,
                self._reorders,
                affine,
                self._positions,
                self.slots(site.region),
            )
            if how.reorder and affine is None:
                assert site.act_node is not None
                rewrite.move_nodes(placement, site.bn_node, site.act_node)
            for name in (bn_name, act_name):
                if name is not None:
                    modules[name] = submodule(root, name)
            return notes, qualified(site.region, new_name)
        assert site.act_node is not None
        if isinstance(how, _CrossSurgery):
            return self._apply_across(site, how, affine)
        rewrite.move_nodes(placement, site.bn_node, site.act_node)
        scope_module = submodule(self.work, how.scope) if how.scope else self.work
        affine_name = None
        if affine is not None:  # beside the BN, under a name of its own
            affine_name = surgery.add_beside(root, bn_name, "affine", affine)
            modules[affine_name] = affine
            rewrite.insert_affine(placement, site.act_node, affine_name)
        notes = rewrite.guard_inplace(site.act_node, modules)
        scope_modules = dict(scope_module.named_modules())
        for local_bn, local_act in how.nodes:
            rewrite.move_nodes(placement, local_bn, local_act)
            if affine_name is not None:
                rewrite.insert_affine(placement, local_act, _relative(affine_name, site.region, how.scope))
            rewrite.guard_inplace(local_act, scope_modules)
        self._dirty.add(how.scope)
        return notes, site.pair.bn

    def _apply_across(
        self, site: Site, how: _CrossSurgery, affine: nn.Module | None
    ) -> tuple[list[str], str]:
        """The activation joins the BN's slot; its call leaves the other forward and the analysis graph."""
        assert site.pair.placement is not None and site.act_node is not None
        modules = self.modules(site.region)
        root = self.regions[site.region].root
        notes: list[str] = []
        if (
            site.pair.placement == "before"
            and input_is_shared(site.bn_node, modules)
            and getattr(how.act_module, "inplace", False)
        ):
            how.act_module.inplace = False  # type: ignore[assignment]
            notes.append("activation made out-of-place: its new input has other readers")
        bn_name = str(site.bn_node.target)
        new_name = surgery.module_move(
            root,
            bn_name,
            None,
            how.act_module,
            site.pair.placement,
            self._reorders,
            affine,
            slots=self.slots(site.region),
        )
        modules[bn_name] = submodule(root, bn_name)
        for node in (site.act_node, *how.nodes):  # the slot calls the activation now
            source = node.args[0]
            assert isinstance(source, fx.Node)
            node.replace_all_uses_with(source)
            node.graph.erase_node(node)
        self._dirty.add(how.scope)
        notes.append(
            f"activation moved into the BN's slot from the forward of {how.scope or 'the model'}, "
            "which bnmove regenerated without it"
        )
        return notes, qualified(site.region, new_name)

    def install(self) -> list[str]:
        """Reorder Sequentials and install the rewritten forwards of every scope that graph moves
        changed; returns the scopes whose forward needs bnmove to load (several graphs)."""
        self._reorders.apply()
        self._positions.clear()  # the reorders changed the Sequentials' keys
        dispatched = []
        for scope in sorted(self._dirty):
            entry = self._scopes.pop(scope)  # its graphs become the module's forward
            assert not isinstance(entry, Blocked)
            module = submodule(self.work, scope) if scope else self.work
            if not install_forward(module, entry[0], self._specialised.get(scope)):
                dispatched.append(scope)
        self._dirty.clear()
        return dispatched


def _holds_node(value: Any) -> bool:
    """Whether an argument carries a traced value (a tensor at run time), at any depth."""
    return any(isinstance(v, fx.Node) for v in pytree.tree_leaves(value))


def _relative(name: str, region: str, scope: str) -> str:
    """A region-relative module name, relative to ``scope`` (a global name) instead."""
    full = qualified(region, name)
    return full[len(scope) + 1 :] if scope else full

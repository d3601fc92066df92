"""Find BatchNorm–activation pairs and say, with a reason, which may move at all.

The pattern is a BN node next to an activation node (``placement="before"``
for ``BN -> f``, ``"after"`` for ``f -> BN``, through Identity links), or a BN
inside a fused norm+act module. The checks here are structural: a BN or an
activation with parameters called at several places, an output another node
also reads, an in-place activation over a shared tensor. A pair that passes is
``movable``; which exact rule moves it (a fold, or the kept affine) is the
rules' decision (`bnmove.rules.settle_exact`), made in the analysis
stage, which fills ``exact``, ``neighbour`` and ``keeps_affine``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

from torch import fx, nn

from ..core.alike import forward_key
from ..core.blocked import Blocked
from ..core.modules import module_calls, qualified
from .batchnorms import is_batchnorm_module, is_functional_batchnorm, is_plain_batchnorm
from .fused import FusedNorm, analyze_fused_norm
from .nodes import describe_node, input_is_shared, is_identity_node, skip_identity_down
from .patterns import ActivationCall, match_activation
from .tracing import Region

Placement = Literal["before", "after"]
PLACEMENTS: tuple[Placement, ...] = ("before", "after")


@dataclass(frozen=True)
class Pair:
    """A BatchNorm next to an activation (or a BatchNorm next to none).

    ``bn`` and ``activation`` are qualified module names, or ``region.node``
    names for functional calls. ``placement`` is ``"before"`` for BN -> f,
    ``"after"`` for f -> BN and ``None`` when no activation is adjacent.
    """

    bn: str
    activation: str | None
    activation_kind: str | None
    placement: Placement | None
    movable: bool
    #: an exact move exists: the BN's affine folds into ``neighbour``, or it is kept
    #: as a per-channel affine layer (``keeps_affine``; ``reason`` says why no fold)
    exact: bool
    reason: str | None = None
    #: the Conv/Linear that absorbs the BN in an exact move
    neighbour: str | None = None
    #: BN and activation live in one fused module (e.g. BatchNormAct2d)
    fused: bool = False
    #: an exact move keeps the BN's eval-mode affine map as a ChannelAffine layer
    keeps_affine: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "bn": self.bn,
            "activation": self.activation,
            "activation_kind": self.activation_kind,
            "placement": self.placement,
            "movable": self.movable,
            "exact": self.exact,
            "reason": self.reason,
            "neighbour": self.neighbour,
            "fused": self.fused,
            "keeps_affine": self.keeps_affine,
        }


@dataclass(frozen=True, eq=False)
class Site:
    """A pair plus the graph nodes it lives on (internal to detect/rewrite).

    Never changed once made: settling its exact rule (`bnmove.rules.settle_exact`) makes a new
    one. Hashed by identity, so that later stages can key what they find per site.
    """

    pair: Pair
    region: str
    bn_node: fx.Node
    act_node: fx.Node | None
    #: the layers an exact move folds the BN into: the one before it (before -> after), or every
    #: one it feeds (after -> before, `forward_fold`); empty: kept affine
    neighbours: tuple[fx.Node, ...] = ()
    fused: FusedNorm | None = None
    #: the name of the exact rule that moves the pair (``bnmove.rules``), once settled
    exact_rule: str | None = None


def node_label(prefix: str, node: fx.Node) -> str:
    if node.op == "call_module":
        return qualified(prefix, str(node.target))
    return qualified(prefix, node.name)


@dataclass(frozen=True)
class RegionView:
    """What checks read of one traced region: its root, its modules, call counts, node names."""

    root: nn.Module
    graph: fx.Graph
    prefix: str
    modules: dict[str, nn.Module]
    #: calls per module target in the region's graph
    calls: dict[str, int]

    @classmethod
    def of(cls, region: Region, prefix: str) -> RegionView:
        return cls(
            region.root, region.graph, prefix, dict(region.root.named_modules()), module_calls(region.graph)
        )

    def label(self, node: fx.Node) -> str:
        """A node as reasons name it: its qualified name in the whole model."""
        return node_label(self.prefix, node)


class _RegionAnalysis:
    def __init__(self, view: RegionView) -> None:
        self.graph = view.graph
        self.prefix = view.prefix
        self.modules = view.modules
        self.calls = view.calls
        self._fused: dict[str, FusedNorm | Blocked | None] = {}
        #: by `forward_key`: fused modules whose forwards trace alike share one analysis
        self._fused_like: dict[Hashable, FusedNorm | Blocked | None] = {}

    def bn_module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module":
            return None
        module = self.modules.get(str(node.target))
        return module if module is not None and is_batchnorm_module(module) else None

    def fused_info(self, node: fx.Node) -> FusedNorm | Blocked | None:
        """The split of a fused norm+act module, or why it has none; None for a plain BatchNorm."""
        module = self.bn_module(node)
        if module is None or is_plain_batchnorm(module):
            return None
        key = str(node.target)
        if key not in self._fused:
            like = forward_key(module, child_settings=True)  # which activation it calls counts
            if like is None:
                self._fused[key] = analyze_fused_norm(module)
            else:
                if like not in self._fused_like:
                    self._fused_like[like] = analyze_fused_norm(module)
                self._fused[key] = self._fused_like[like]
        return self._fused[key]

    def sites(self) -> list[Site]:
        out: list[Site] = []
        for node in self.graph.nodes:
            module = self.bn_module(node)
            if module is None and not is_functional_batchnorm(node):
                continue
            out.extend(self._sites_for_bn(node, module))
        return out

    # -- checks shared by both placements ---------------------------------
    def _bn_blocker(self, node: fx.Node, module: nn.Module | None) -> str | None:
        if module is not None and self.calls[str(node.target)] > 1:
            return f"BatchNorm {self._label(node)} is called at {self.calls[str(node.target)]} places"
        return None

    def _act_blocker(self, act: fx.Node) -> str | None:
        if act.op == "call_module" and self.calls[str(act.target)] > 1:
            module = self.modules[str(act.target)]
            if any(True for _ in module.parameters()):
                return (
                    f"activation {self._label(act)} has parameters and is called at "
                    f"{self.calls[str(act.target)]} places"
                )
        return None

    def _label(self, node: fx.Node) -> str:
        return node_label(self.prefix, node)

    # -- pattern: one BN node -> its pairs ---------------------------------
    def _sites_for_bn(self, bn: fx.Node, module: nn.Module | None) -> list[Site]:
        sites: list[Site] = []
        fused = self.fused_info(bn)
        if isinstance(fused, FusedNorm):
            sites.append(self._before_site(bn, module, None, fused.call, fused))
        elif isinstance(fused, Blocked):
            sites.append(self._site(bn, None, None, None, False, fused.reason))
            return sites
        else:
            end = skip_identity_down(bn, self.modules)
            for user in end.users:
                call = match_activation(user, self.modules)
                if call is not None and user.args and user.args[0] is end:
                    sites.append(self._before_site(bn, module, user, call, None))
        source = bn.args[0] if bn.args else None
        if isinstance(source, fx.Node):
            # Through every link, shared or not: a shared one still makes a pair, which cannot move.
            while is_identity_node(source, self.modules) and isinstance(source.args[0], fx.Node):
                source = source.args[0]
            call = match_activation(source, self.modules)
            if call is not None:
                sites.append(self._after_site(bn, module, source, call))
        if not sites:
            feeds = ", ".join(describe_node(u, self.modules) for u in bn.users) or "nothing"
            sites.append(
                self._site(bn, None, None, None, False, f"not adjacent to an activation (feeds {feeds})")
            )
        return sites

    def _site(
        self,
        bn: fx.Node,
        act: fx.Node | None,
        call: ActivationCall | None,
        placement: Placement | None,
        movable: bool,
        reason: str | None,
        fused: FusedNorm | None = None,
    ) -> Site:
        act_name: str | None
        if fused is not None:
            act_name = (
                qualified(self._label(bn), fused.act_child)
                if fused.act_child
                else f"{self._label(bn)}:{getattr(fused.act_target, '__name__', fused.act_target)}"
            )
        else:
            act_name = self._label(act) if act is not None else None
        pair = Pair(
            bn=self._label(bn),
            activation=act_name,
            activation_kind=call.spec.kind if call else None,
            placement=placement,
            movable=movable,
            exact=False,
            reason=reason,
            fused=fused is not None,
        )
        return Site(pair, self.prefix, bn, act, fused=fused)

    def _before_site(
        self,
        bn: fx.Node,
        module: nn.Module | None,
        act: fx.Node | None,
        call: ActivationCall,
        fused: FusedNorm | None,
    ) -> Site:
        blocker = self._bn_blocker(bn, module)
        end = skip_identity_down(bn, self.modules)
        if blocker is None and act is not None:
            if len(end.users) > 1:
                others = [u for u in end.users if u is not act]
                blocker = f"the BN output also feeds {describe_node(others[0], self.modules)}"
            else:
                blocker = self._act_blocker(act)
        if blocker:
            return self._site(bn, act, call, "before", False, blocker, fused=fused)
        return self._site(bn, act, call, "before", True, None, fused)

    def _shared_link(self, act: fx.Node, bn: fx.Node) -> fx.Node | None:
        """Another reader of the activation's output (directly or through a link before the BN)."""
        node, chain = bn, []
        while node is not act:
            parent = node.args[0]
            assert isinstance(parent, fx.Node)
            chain.append((parent, node))
            node = parent
        for link, next_node in chain:
            others = [u for u in link.users if u is not next_node]
            if others:
                return others[0]
        return None

    def _after_site(self, bn: fx.Node, module: nn.Module | None, act: fx.Node, call: ActivationCall) -> Site:
        blocker = self._bn_blocker(bn, module)
        if blocker is None:
            shared = self._shared_link(act, bn)
            if shared is not None:
                blocker = f"the activation output also feeds {describe_node(shared, self.modules)}"
            elif call.inplace and input_is_shared(act, self.modules):
                blocker = "the in-place activation overwrites a tensor that other nodes read"
            elif self.fused_info(bn) is not None:
                blocker = "fused norm+activation module after another activation"
            else:
                blocker = self._act_blocker(act)
        if blocker:
            return self._site(bn, act, call, "after", False, blocker)
        return self._site(bn, act, call, "after", True, None)


def analyze_regions(views: dict[str, RegionView]) -> list[Site]:
    """All sites of all traced regions, in graph order."""
    sites: list[Site] = []
    for view in views.values():
        sites.extend(_RegionAnalysis(view).sites())
    return sites


def has_uninitialized_lazy(model: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())

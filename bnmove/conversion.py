"""``convert``: move every movable BatchNorm to one side of its activation.

Flow: copy -> trace (whole, or the largest traceable parts) -> detect ->
rewrite each pair (exact | swap) -> recompile -> verify against the original
in eval mode. The input model is never modified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from . import rewrite
from ._clone import clone_module
from ._gc import paused_gc
from .detect import PLACEMENTS, Pair, Site, analyze_regions, has_uninitialized_lazy
from .errors import BnmoveError, VerificationError
from .tracing import Untraced, set_submodule, trace_regions
from .verify import Deviation, compare_models, infer_example_inputs

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "swap"]
METHODS: tuple[str, ...] = ("auto", "exact", "swap")


@dataclass(frozen=True)
class Move:
    """What happened to one pair."""

    pair: Pair
    moved: bool
    #: "exact" (eval outputs kept) or "swap" (reordered, parameters untouched); None if not moved
    method: str | None
    reason: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def keeps_outputs(self) -> bool:
        return not self.moved or self.method == "exact"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair.to_dict(),
            "moved": self.moved,
            "method": self.method,
            "keeps_outputs": self.keeps_outputs,
            "reason": self.reason,
            "notes": list(self.notes),
        }


@dataclass
class Conversion:
    """The converted model, one :class:`Move` per pair, and the verification."""

    model: nn.Module
    placement: str
    method: str
    moves: list[Move]
    verification: Deviation | None
    untraced: list[Untraced] = field(default_factory=list)

    @property
    def moved(self) -> list[Move]:
        return [m for m in self.moves if m.moved]

    @property
    def changed_function(self) -> list[Move]:
        """Moves that change the model's eval-mode function (swaps)."""
        return [m for m in self.moves if m.moved and not m.keeps_outputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "method": self.method,
            "moved": len(self.moved),
            "moved_exact": sum(1 for m in self.moved if m.method == "exact"),
            "moved_swap": sum(1 for m in self.moved if m.method == "swap"),
            "moves": [m.to_dict() for m in self.moves],
            "verification": self.verification.to_dict() if self.verification else None,
            "untraced": [u.__dict__ for u in self.untraced],
        }


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BnmoveError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _plan(site: Site, placement: str, method: str, taken: set[fx.Node]) -> tuple[str | None, str | None]:
    """Which method moves this site, or why it stays (None, reason)."""
    pair = site.pair
    if pair.placement is None:
        return None, pair.reason
    if pair.placement == placement:
        return None, f"already {placement} the activation"
    if not pair.movable:
        return None, pair.reason
    if site.bn_node in taken or site.act_node in taken:
        return None, "its BatchNorm or activation already moved with another pair"
    if method == "swap":
        return "swap", None
    if pair.exact:
        return "exact", None
    if method == "exact":
        return None, f"no exact move: {pair.reason}"
    return "swap", None


def _install(work: nn.Module, name: str, gm: fx.GraphModule, original: nn.Module) -> nn.Module:
    gm.training = original.training
    if name:
        set_submodule(work, name, gm)
        return work
    _keep_unused_modules(gm, original)
    return gm


def _keep_unused_modules(gm: fx.GraphModule, original: nn.Module) -> None:
    """fx drops modules that forward never calls; put them back so nothing is lost."""
    have = set(gm.state_dict())
    for name, module in original.named_modules():
        own = [k for k, _ in module.named_parameters(recurse=False)] + [
            k for k, _ in module.named_buffers(recurse=False)
        ]
        if name and own and any(f"{name}.{k}" not in have for k in own):
            try:
                gm.get_submodule(name)
            except AttributeError:
                parent = gm
                *path, leaf = name.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, module)


def convert(
    model: nn.Module,
    placement: str,
    *,
    method: str = "auto",
    example_inputs: Sequence[torch.Tensor] | None = None,
    verify: bool = True,
) -> Conversion:
    """Move every movable BatchNorm ``placement`` (``"before"``/``"after"``) its activation.

    Args:
        model: the model to convert; it is copied, never modified.
        placement: ``"before"`` (BN -> f) or ``"after"`` (f -> BN).
        method: ``"exact"`` moves only where eval outputs stay the same (BN
            folded into the neighbouring Conv/Linear, an identity BN with real
            statistics on the other side); ``"swap"`` reorders and leaves
            parameters untouched; ``"auto"`` is exact where possible, swap elsewhere.
        example_inputs: inputs for the verification run; inferred from the
            first layer when not given.
        verify: compare original and converted outputs in eval mode.

    Returns:
        A :class:`Conversion`; with ``method="exact"`` a deviation above float
        tolerance raises :class:`VerificationError` instead.

    Example:
        >>> result = convert(model, "after", method="exact")
        >>> result.verification.max_abs_error   # ~1e-6
    """
    with paused_gc():
        return _convert(model, placement, method, example_inputs, verify)


def _convert(
    model: nn.Module,
    placement: str,
    method: str,
    example_inputs: Sequence[torch.Tensor] | None,
    verify: bool,
) -> Conversion:
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("method", method, METHODS)
    if has_uninitialized_lazy(model):
        raise BnmoveError("the model has lazy layers that are not initialised; run one forward pass first")
    work = clone_module(model)
    traced = trace_regions(work)
    inputs: tuple[torch.Tensor, ...] | None = tuple(example_inputs) if example_inputs is not None else None
    if inputs is None and verify:
        whole = traced.regions.get("")
        inputs = infer_example_inputs(model, whole.graph if whole else None)
    sites = analyze_regions(traced.regions)

    moves: list[Move] = []
    taken: set[fx.Node] = set()
    touched: set[str] = set()
    region_modules: dict[str, dict[str, nn.Module]] = {}
    for site in sites:
        chosen, reason = _plan(site, placement, method, taken)
        if chosen is None:
            moves.append(Move(site.pair, False, None, reason))
            continue
        root = traced.regions[site.region].root
        if site.region not in region_modules:
            region_modules[site.region] = dict(root.named_modules())
        notes = rewrite.move(root, site, chosen, region_modules[site.region])
        taken.update(n for n in (site.bn_node, site.act_node) if n is not None)
        touched.add(site.region)
        why = site.pair.reason if chosen == "swap" and method == "auto" else None
        moves.append(Move(site.pair, True, chosen, why, tuple(notes)))

    converted = work
    for name in touched:
        region = traced.regions[name]
        region.graph.lint()
        gm = region.graph_module()
        region_original = region.root
        converted = _install(converted, name, gm, region_original)

    deviation = None
    if verify and inputs is not None:
        deviation = compare_models(model, converted, inputs)
        claimed_exact = all(m.keeps_outputs for m in moves)
        if claimed_exact and not deviation.within_tolerance:
            raise VerificationError(
                f"exact conversion changed outputs: max abs error {deviation.max_abs_error:.3g} "
                f"(relative {deviation.max_rel_error:.3g} > {deviation.tolerance:g}); please report this model"
            )
    log.info("moved %d of %d pairs", sum(m.moved for m in moves), len(moves))
    return Conversion(converted, placement, method, moves, deviation, traced.untraced)

"""Stage 1, *analyse*: the analysis graph, every BN's pairs, and whether each pair can move at all.

The analysis is made once and carried by the later stages: the graph the
pairs were found on, the sites, the exact rule of every movable pair
(`bnmove.rules.settle_exact`), and the structural move that will hold it (`Mover`). A pair whose
move no structure holds (the BN and activation are called from two different
forwards, a forward that torch.fx cannot trace) is reported unmovable here,
with the reason, so [`find_pairs`][bnmove.find_pairs] (``bnmove inspect``) says exactly what
[`convert`][bnmove.convert] and ``bnmove export`` will do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from ..analysis.detect import Pair, Site, analyze_regions
from ..analysis.regions import analysis_regions
from ..analysis.tracing import TraceResult, Untraced
from ..core.blocked import Blocked
from ..core.gc_pause import paused_gc
from ..moving.placing import Mover, Structure
from ..rules import Context, settle_exact


@dataclass
class Analysis:
    """What the later stages read: the analysed module, its graph(s), the sites and their structures."""

    model: nn.Module
    traced: TraceResult
    sites: list[Site]
    mover: Mover
    #: the structural move of each movable site
    structures: dict[Site, Structure]
    #: what rule checks read, per region
    contexts: dict[str, Context]

    @property
    def traced_whole(self) -> fx.Graph | None:
        """The whole model's fx graph when it traced whole (not recorded, not in parts)."""
        whole = self.traced.regions.get("")
        return whole.graph if whole is not None and not whole.recorded else None

    def structure(self, site: Site) -> Structure | None:
        return self.structures.get(site)


def analyse(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> Analysis:
    """Analyse ``model`` in place (it is only read: tracing and recording leave it as it was).

    A movable pair that no structural move holds comes back unmovable, with the reason.
    """
    traced = analysis_regions(model, example_inputs)
    contexts = {prefix: Context.of(region, prefix) for prefix, region in traced.regions.items()}
    mover = Mover(model, traced.regions)
    sites: list[Site] = []
    structures: dict[Site, Structure] = {}
    for found in analyze_regions(contexts):
        if found.pair.placement is None or not found.pair.movable:
            sites.append(found)
            continue
        site = settle_exact(found, contexts[found.region])
        how = mover.structure(site, contexts[site.region])
        if isinstance(how, Blocked):
            site = replace(site, pair=_unmovable(site.pair, how.reason), exact_rule=None, neighbours=())
        else:
            structures[site] = how
        sites.append(site)
    return Analysis(model, traced, sites, mover, structures, contexts)


def _unmovable(pair: Pair, reason: str) -> Pair:
    return replace(pair, movable=False, exact=False, reason=reason, neighbour=None, keeps_affine=False)


@dataclass
class Detection:
    """Pairs of a model plus what could not be traced."""

    pairs: list[Pair]
    untraced: list[Untraced]


def detect(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> Detection:
    """Detection with the trace report; [`find_pairs`][bnmove.find_pairs] returns just the pairs."""
    # Tracing does not need parameter values, so uninitialised lazy modules are
    # fine here (their pairs say so). The model itself is never changed: a model
    # that does not trace is recorded running on a copy.
    with paused_gc():
        analysis = analyse(model, example_inputs)
    return Detection([s.pair for s in analysis.sites], analysis.traced.untraced)


def find_pairs(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> list[Pair]:
    """Every BatchNorm in ``model`` with the activation next to it, if any.

    ``movable`` and ``exact`` say what [`convert`][bnmove.convert] does to the pair
    when asked for the other placement: a movable pair is moved, an exact one
    exactly, and an unmovable one stays with this ``reason``.

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: used only when the model does not trace with torch.fx:
            then one forward pass on them (on a copy) is recorded instead;
            inferred from the first layer when not given.

    Returns:
        One [`Pair`][bnmove.Pair] per BN–activation adjacency, in graph order, plus one
        per BatchNorm with no adjacent activation (``placement=None``).

    Example:
        >>> pairs = find_pairs(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        >>> pairs[0].placement, pairs[0].exact
        ('before', True)
    """
    return detect(model, example_inputs).pairs

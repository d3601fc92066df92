"""The analysis graph of a model: what bnmove reads to decide what moves.

``symbolic_trace`` of the whole model is tried first. Real models often fail
it (padding computed from shapes, optional arguments tested in ``forward``,
loops over ``torch.split``); then one forward pass on an example input is
recorded instead (`bnmove.analysis.recording`), which sees through all of that.
Only when no example input can be had are the largest traceable subtrees
traced one by one, and the untraceable parts reported by name.

The graph only decides what moves; the moves themselves are made on the
user's modules (`bnmove.moving.surgery`). Tracing never changes the model it
reads (`untouched`).

BatchNorm modules (user subclasses included, so fused norm+activation modules
stay whole) and activation modules are leaves: the tracer never inlines them,
which keeps train/eval behaviour live instead of baking it into the graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx, nn

from ..core.affine import ChannelAffine
from ..core.forwards import class_forward
from ..core.modules import first_line
from .batchnorms import is_batchnorm_module
from .composite import collapse_composites
from .layers import custom_affine_layer, torch_forward
from .patterns import module_activation_spec, recognise

log = logging.getLogger(__name__)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def is_leaf(module: nn.Module) -> bool:
    """The one leaf rule of the analysis graph, traced or recorded: BatchNorms, activations, torch's
    own non-container layers and library subclasses of them, and the layers a BN folds into exactly
    (a library Conv/Linear with its own forward, a kept ChannelAffine) each stay one call."""
    if is_batchnorm_module(module) or module_activation_spec(module) is not None:
        return True
    if custom_affine_layer(module) or isinstance(module, ChannelAffine):
        return True
    return torch_forward(module) and not isinstance(module, _CONTAINERS)


class BnTracer(fx.Tracer):
    """fx tracer that keeps `is_leaf` modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace_graph(module: nn.Module) -> fx.Graph:
    """Trace one module's forward with `BnTracer`; raises whatever fx raises."""
    recognise(module)
    with class_forward(module):
        graph = BnTracer().trace(module)
    collapse_composites(graph)
    for node in graph.nodes:
        # Under `from __future__ import annotations` fx records annotations as
        # strings, which GraphModule cannot pickle or import: drop them.
        if isinstance(node.type, str):
            node.type = None
    return graph


def trace_module(module: nn.Module) -> fx.GraphModule:
    """``trace_graph`` wrapped into a runnable GraphModule."""
    return Region(module, trace_graph(module)).graph_module()


@dataclass
class Region:
    """A traced module: its graph, and the module its node targets resolve against.

    Detection and rewriting need only these two; the GraphModule (which copies
    attributes and compiles code) is built once, after rewriting.
    """

    root: nn.Module
    graph: fx.Graph
    #: recorded from a forward pass: describes the model, cannot be run as a GraphModule
    recorded: bool = False

    def graph_module(self) -> fx.GraphModule:
        return fx.GraphModule(self.root, self.graph, class_name=type(self.root).__name__)


@dataclass(frozen=True)
class Untraced:
    """A part of the model that torch.fx could not trace."""

    name: str
    type_name: str
    reason: str


@dataclass
class TraceResult:
    """Traced regions by qualified name ("" is the whole model) and the parts left out."""

    regions: dict[str, Region]
    untraced: list[Untraced]


def _is_opaque_leaf(module: nn.Module) -> bool:
    # Nothing inside to rewrite: a module with no children, or a BN/activation.
    return (
        not any(True for _ in module.children())
        or is_batchnorm_module(module)
        or module_activation_spec(module) is not None
    )


def trace_regions(model: nn.Module) -> TraceResult:
    """Trace ``model`` whole, or else the largest subtrees that trace.

    Example:
        >>> result = trace_regions(torchvision_style_resnet)
        >>> list(result.regions)      # [""] when the whole model traced
    """
    regions: dict[str, Region] = {}
    untraced: list[Untraced] = []

    def visit(name: str, module: nn.Module) -> None:
        if name and _is_opaque_leaf(module):
            return
        try:
            regions[name] = Region(module, trace_graph(module))
            return
        except Exception as exc:  # fx raises many types for untraceable code
            reason = first_line(exc)
            log.info("could not trace %s: %s", name or "<model>", reason)
            untraced.append(Untraced(name or "<model>", type(module).__name__, reason))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return TraceResult(regions, untraced)

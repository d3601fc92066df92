"""The model's analysis graph: traced whole, else recorded from one forward, else traced in parts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..core.clone import clone_module
from ..core.modules import first_line
from ..core.running import untouched
from .inputs import infer_example_inputs
from .recording import record_graph
from .tracing import Region, TraceResult, trace_graph, trace_regions

log = logging.getLogger(__name__)


def analysis_regions(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> TraceResult:
    """The model's analysis graph: traced whole, else recorded from one forward, else traced in parts.

    ``example_inputs`` feed the recording; when None they are inferred from the
    first layer where possible. The model is not changed (the recording runs
    on a copy).
    """
    with untouched(model):
        try:
            return TraceResult({"": Region(model, trace_graph(model))}, [])
        except Exception as exc:
            reason = first_line(exc)
            log.info("could not trace the whole model: %s", reason)
    inputs = example_inputs
    if inputs is None:
        try:
            inputs = infer_example_inputs(model)
        except Exception:
            inputs = None
    if inputs is not None:
        try:
            graph = record_graph(clone_module(model), inputs)
            return TraceResult({"": Region(model, graph, recorded=True)}, [])
        except Exception as exc:
            log.info("could not record a forward pass: %s", first_line(exc))
    with untouched(model):
        return trace_regions(model)

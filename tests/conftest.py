from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))


def outputs_of(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(*[x.clone() for x in inputs])
    finally:
        for m, flag in flags:
            m.training = flag


def assert_same_outputs(
    reference: nn.Module, converted: nn.Module, inputs: Sequence[torch.Tensor], rtol: float = 1e-4
) -> None:
    """Eval outputs equal within float tolerance, relative to the reference's magnitude."""
    want = outputs_of(reference, inputs)
    got = outputs_of(converted, inputs)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=rtol * max(scale, 1e-6))


# Property tests: a CI-friendly default; `HYPOTHESIS_PROFILE=medium` (300) or `long` (3000 examples).
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "medium", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile(
    "long", max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def renamed_key(result: Any, key: str) -> str:
    """Where a state-dict key of the original lives in ``result.model`` (a moved BN's slot may
    have become ``Sequential(act, bn)``: ``bn1.weight`` -> ``bn1.1.weight``)."""
    for move in result.moved:
        if move.moved_to and key.startswith(move.pair.bn + "."):
            return str(move.moved_to) + key[len(move.pair.bn) :]
    return key

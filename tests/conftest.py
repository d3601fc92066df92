from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

from bnmove.moving.verify import output_tensors

sys.path.insert(0, str(Path(__file__).parent))


def outputs_of(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """``model(*inputs)`` in eval mode, no grad, on copies of the input tensors (any structure)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return model(*tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, list(inputs)))
    finally:
        for m, flag in flags:
            m.training = flag


def assert_same_outputs(
    reference: nn.Module, converted: nn.Module, inputs: Sequence[Any], rtol: float = 1e-4
) -> None:
    """Every output tensor (any structure) equal within float tolerance, relative to the reference's magnitude."""
    want = output_tensors(outputs_of(reference, inputs))
    got = output_tensors(outputs_of(converted, inputs))
    assert len(want) == len(got) and want, "different output structure"
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=rtol * max(scale, 1e-6))


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


@pytest.fixture
def digits_study(tmp_path: Path) -> list[str]:
    """``bnmove experiment`` arguments for the bundled digits CNN (pickled in ``tmp_path``), one epoch
    on scikit-learn's digits; tests add ``--seeds`` and the rest."""
    from bnmove.sample_models import digits_net

    model_file = tmp_path / "digits.pt"
    torch.save(digits_net(), model_file)
    return ["experiment", str(model_file), "--allow-pickle", "--data", "digits", "--epochs", "1"]

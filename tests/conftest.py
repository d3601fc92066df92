from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bnmove.core.fidelity import difference
from bnmove.core.running import eval_mode, output_tensors, run_model

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, whichever worker runs it after whichever
    tests: a test that draws without a seed of its own draws the same numbers on every run."""
    torch.manual_seed(0)


def outputs_of(model: nn.Module, inputs: Sequence[Any]) -> Any:
    """``model(*inputs)`` in eval mode, no grad, on copies of the input tensors (any structure)."""
    with eval_mode(model):
        return run_model(model, inputs)


def assert_same_outputs(
    reference: nn.Module, converted: nn.Module, inputs: Sequence[Any], rtol: float = 1e-4
) -> None:
    """Every output tensor (any structure) equal within float tolerance, relative to the reference's magnitude."""
    want = output_tensors(outputs_of(reference, inputs))
    got = output_tensors(outputs_of(converted, inputs))
    assert want, "the reference returns no tensor"
    measured = difference(want, got)  # raises on a different structure
    assert measured.max_abs <= rtol * max(measured.scale, 1e-6), measured


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

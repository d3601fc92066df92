"""One run of a study, whoever trains it: its identity, its starting model, its progress events.

Every variant of a seed starts from the same point: by default one random initialisation
(`reinitialize`), converted with ``swap`` (which keeps every parameter, so the variants
differ only in where BN sits); with ``from_pretrained`` the trained weights, converted with
``auto`` (exact where possible) for fine-tuning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.clone import clone_module
from ..pipeline.conversion import convert
from .jobs import Job

VARIANTS = ("original", "before", "after")


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass
class Finished:
    run: Run
    job: Job
    model: nn.Module | None


@dataclass(frozen=True)
class RunStarted:
    """Progress event: a run began on ``device``."""

    variant: str
    seed: int
    device: str


@dataclass(frozen=True)
class RunFinished:
    """Progress event: a run ended with these metrics."""

    variant: str
    seed: int
    metrics: dict[str, float]


def weights_digest(model: nn.Module) -> str:
    """Digest of the parameter and buffer *values*, sorted, so it ignores names and graph order."""
    blobs = sorted(t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values())
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    return digest.hexdigest()


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh random weights (and BN statistics) from ``seed``, layer by layer, in module order."""
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def start_model(
    model: nn.Module, run: Run, from_pretrained: bool, example: tuple[torch.Tensor, ...]
) -> nn.Module:
    """The model ``run`` starts from, on the CPU: the seed's initialisation (or the pretrained
    weights) with BN placed as ``run.variant`` says."""
    base = clone_module(model).cpu()
    if not from_pretrained:
        reinitialize(base, run.seed)
    if run.variant == "original":
        return base
    method = "auto" if from_pretrained else "swap"
    return convert(base, run.variant, method=method, example_inputs=example).model


def class_scores(output: Any) -> Any:
    """The class scores in a model's output: the tensor itself, ``logits`` of an HF ``ModelOutput``
    (or any mapping/object with that field), or the first element of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output

"""What an experiment checks before it trains: the data fits the model, and what the finished runs were made from."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..core.clone import clone_module
from ..errors import BnmoveError, ModelRunError
from .data import Dataset
from .runs import class_scores, weights_digest


def check_data(model: nn.Module, data: Dataset) -> int:
    """Fail before any training when data and model do not fit; returns the number of classes."""
    probe = clone_module(model).eval()
    x = data.sample(2)
    try:
        with torch.no_grad():
            out = class_scores(probe(x.to(next(probe.parameters()).device)))
    except Exception as exc:
        raise ModelRunError(
            f"the model does not accept samples of shape {tuple(x.shape[1:])} from {data.name}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BnmoveError(f"the model must return class scores (batch x classes), it returns {shape}")
    return int(out.shape[1])


def match_classes(model: nn.Module, data: Dataset) -> tuple[nn.Module, str | None]:
    """The model with as many outputs as the data has classes: as given, or with its classifier
    reset where the model offers a way (timm's ``reset_classifier``, seeded); else an error with
    the numbers. Returns the model and a note when it was reset."""
    scored = check_data(model, data)
    wanted = data.num_classes
    if wanted is None or scored == wanted:
        return model, None
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        fitted = clone_module(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same new head on every (re-)run: runs stay resumable
            fitted.reset_classifier(wanted)  # type: ignore[operator]
        if check_data(fitted, data) == wanted:
            return fitted, (
                f"the model scores {scored} classes and {data.name} has {wanted}: its classifier "
                f"was reset to {wanted} classes (reset_classifier)"
            )
    raise BnmoveError(
        f"the model scores {scored} classes but {data.name} has {wanted} (labels 0 to {wanted - 1}); "
        f"give a model with {wanted} outputs (a library model: --arch-arg num_classes={wanted})"
    )


def _model_digest(model: nn.Module, from_pretrained: bool) -> str:
    if from_pretrained:  # training starts from these weights
        return weights_digest(model)
    # each seed re-initialises: the architecture matters, not these weights
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    return hashlib.sha256(json.dumps([type(model).__qualname__, shapes]).encode()).hexdigest()


def _data_digest(data: Dataset) -> str:
    """What identifies the data: its values, or for streamed data what identifies the items."""
    digest = hashlib.sha256()
    data.train.fingerprint(digest)
    data.val.fingerprint(digest)
    return digest.hexdigest()

"""Run a model without changing it: eval mode, no grad, nothing its forward caches kept."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ModelRunError


def _plain_flags(modules: list[nn.Module]) -> bool:
    """Whether every module's class takes torch's own ``train`` and ``__setattr__``: then setting
    each flag directly is what ``train`` does, without a call and a recursion per module."""
    return all(
        type(m).train is nn.Module.train and type(m).__setattr__ is nn.Module.__setattr__ for m in modules
    )


def kept_modes(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Whatever the block does to train/eval flags, each module's own flag is put back after."""
    return _modes(model, to_eval=False)


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Put every module in eval mode and restore each module's own flag after."""
    return _modes(model, to_eval=True)


@contextlib.contextmanager
def _modes(model: nn.Module, *, to_eval: bool) -> Iterator[nn.Module]:
    modules = list(model.modules())
    flags = [m.training for m in modules]
    plain = _plain_flags(modules)
    try:
        if to_eval and plain:
            for module in modules:
                object.__setattr__(module, "training", False)
        elif to_eval:
            model.eval()  # a class's own train() decides what eval means for it
        yield model
    finally:
        for module, flag in zip(modules, flags, strict=True):
            if plain:
                object.__setattr__(module, "training", flag)
            else:
                module.training = flag


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Whatever happens inside, every module's attributes, parameters, buffers and children are put back.

    torch.fx calls ``forward`` with Proxies; a module that caches a tensor in a
    plain attribute (an attention-bias cache) would keep a Proxy afterwards.
    """
    saved = [
        (m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
        for m in model.modules()
    ]
    try:
        yield
    finally:
        for module, state, params, buffers, children in saved:
            module.__dict__.clear()
            module.__dict__.update(state)
            stores: list[tuple[dict[str, Any], dict[str, Any]]] = [
                (module._parameters, params),
                (module._buffers, buffers),
                (module._modules, children),
            ]
            for store, old in stores:
                store.clear()
                store.update(old)


def run_model(model: nn.Module, inputs: Sequence[torch.Tensor]) -> Any:
    """``model(*inputs)`` without grad; the model's own exceptions become [`ModelRunError`][bnmove.ModelRunError]."""
    try:
        with torch.inference_mode():  # cheaper than no_grad: outputs are only compared
            return model(*tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, list(inputs)))
    except Exception as exc:
        shapes = ", ".join(
            "x".join(map(str, x.shape)) for x in tree_flatten(list(inputs))[0] if isinstance(x, torch.Tensor)
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelRunError(
            f"the model's forward raised {type(exc).__name__} on input {shapes}: {first}"
        ) from exc


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in an output of any structure: tensors, tuples, lists, dicts (HF ``ModelOutput``
    included), dataclasses, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for value in output for t in output_tensors(value)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for f in dataclasses.fields(output) for t in output_tensors(getattr(output, f.name))]
    return []


def double_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Floating-point tensors of ``inputs`` (any structure) in float64."""
    return tuple(
        tree_map(
            lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, list(inputs)
        )
    )


def inputs_from_shapes(model: nn.Module, shapes: Sequence[tuple[int, ...]]) -> tuple[torch.Tensor, ...]:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator).to(device=device, dtype=dtype) for s in shapes)

"""Build again the modules bnmove changed in a model, from a description that JSON holds.

A Hugging Face ``save_pretrained`` folder holds weights and a config, and ``from_pretrained``
builds the model from the config: the original placement. bnmove's folder adds the modules the
conversion changed to the config (``bnmove_structure``: per changed module, its class, plain
settings and the shapes of its tensors) and this file, as ``modeling_bnmove.py``, whose class
builds the model from the config and then these modules again, so that ``from_pretrained`` loads
the weights into the converted placement. This file needs torch alone (the class the folder adds
after it imports the model's class from transformers): it is copied into the folder as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: modules are built from classes of these packages only (and the kept affine below)
TRUSTED = ("torch.", "transformers.")


class ChannelAffine(nn.Module):
    """``y = weight[c] * x + bias[c]`` over channel dimension 1: the BN's eval-mode map that an
    exact move keeps where no layer can absorb it."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


def decode(value: Any) -> Any:
    """A setting as it was: JSON keeps tuples and lists apart as ``{"tuple": [...]}``/``{"list": [...]}``,
    and a function of torch or transformers is ``{"function": [module, name]}``."""
    if isinstance(value, dict):
        ((kind, items),) = value.items()
        if kind == "function":
            return _named(*items)
        decoded = [decode(v) for v in items]
        return tuple(decoded) if kind == "tuple" else decoded
    return value


def _named(module: str, qualname: str) -> Any:
    if not module.startswith(TRUSTED):
        raise ValueError(f"bnmove_structure names {module}:{qualname}, not of torch or transformers")
    found: Any = importlib.import_module(module)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _class(name: str) -> type[nn.Module]:
    module, _, qualname = name.partition(":")
    if not module.startswith(TRUSTED):
        raise ValueError(f"bnmove_structure names {name}, not a class of torch or transformers")
    found = _named(module, qualname)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ValueError(f"bnmove_structure names {name}, which is not a module class")
    return found


def _tensor(shape: list[int], dtype: str) -> torch.Tensor:
    kind = getattr(torch, dtype)
    # floating tensors in the dtype the model is being built in (from_pretrained's dtype=...)
    return torch.empty(shape, dtype=torch.get_default_dtype() if kind.is_floating_point else kind)


def build(spec: dict[str, Any], affine: Callable[[int], nn.Module] = ChannelAffine) -> nn.Module:
    """The module ``spec`` describes, its tensors uninitialised (the weights are loaded after); a
    kept affine made by ``affine`` (bnmove's loader passes its own)."""
    if "channel_affine" in spec:
        return affine(spec["channel_affine"]).train(spec["training"])
    cls = _class(spec["class"])
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in spec["settings"]:
        module.__dict__[name] = decode(value)
    for name, tensor in spec["parameters"]:
        if tensor is None:
            module.register_parameter(name, None)
            continue
        shape, dtype, grad = tensor
        module.register_parameter(name, nn.Parameter(_tensor(shape, dtype), requires_grad=grad))
    for name, shape, dtype, persistent in spec["buffers"]:
        module.register_buffer(name, None if shape is None else _tensor(shape, dtype), persistent=persistent)
    for name, child in spec["children"]:
        module.add_module(name, None if child is None else build(child, affine))
    module.train(spec["training"])
    return module


def rebuild(
    model: nn.Module, structure: list[list[Any]], affine: Callable[[int], nn.Module] = ChannelAffine
) -> None:
    """Put every module of ``structure`` (``[path, spec]`` pairs) in its place in ``model``."""
    for path, spec in structure:
        owner, _, name = path.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        old = parent._modules.get(name)
        new = None if spec is None else build(spec, affine)  # a child set to None stays None
        if old is not None and new is not None:  # on the device the model was built on
            reference = next(old.parameters(), None)
            if reference is not None:
                new.to(device=reference.device)
        parent._modules[name] = new

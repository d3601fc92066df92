"""Activation as a factor of the placement study: the same model with every activation replaced.

The literature's placement tables cross the placement with the activation (BN after Tanh can win
where BN before ReLU does). `replace_activations` gives the model another activation kind
everywhere it has a stateless activation *module* (torch's, a library's or the user's own class,
recognised by what it computes, as detection does); activations called as functions in forward
code (``F.relu(x)``) and activations with parameters (``PReLU``) are left as they are and listed,
so a study never claims a replacement it did not make.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.patterns import match_activation, module_activation_spec
from ..analysis.regions import analysis_regions
from ..core.clone import clone_module
from ..core.modules import set_submodule
from ..errors import BnmoveError

#: kind -> a fresh module computing it
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


@dataclass
class Replacement:
    """A copy of the model with its activation modules replaced, and what was left alone."""

    model: nn.Module
    kind: str
    #: activation modules replaced (a module called at several places counts once)
    replaced: list[str]
    #: activations left as they are: functions in forward code, modules with parameters
    left: list[str]


def replace_activations(
    model: nn.Module, kind: str, example_inputs: Sequence[torch.Tensor] | None = None
) -> Replacement:
    """A copy of ``model`` with every stateless activation module replaced by ``kind``.

    ``model`` is not modified. Raises [`BnmoveError`][bnmove.BnmoveError] for an unknown kind or a model with no
    activation module to replace.
    """
    factory = ACTIVATIONS.get(kind.lower())
    if factory is None:
        raise BnmoveError(f"unknown activation {kind!r}; choose from {', '.join(ACTIVATIONS)}")
    work = clone_module(model)
    replaced, left = [], []
    for name, module in list(work.named_modules()):
        if not name or module_activation_spec(module) is None:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            left.append(f"{name} ({type(module).__name__}: has parameters)")
            continue
        set_submodule(work, name, factory())
        replaced.append(name)
    for prefix, region in analysis_regions(work, example_inputs).regions.items():
        modules = dict(region.root.named_modules())
        for node in region.graph.nodes:
            if node.op in ("call_function", "call_method") and match_activation(node, modules) is not None:
                where = f"{prefix}: " if prefix else ""
                left.append(f"{where}{node.name} (a function in forward code)")
    if not replaced:
        found = f" (left: {', '.join(left[:3])})" if left else ""
        raise BnmoveError(f"the model has no activation module to replace with {kind}{found}")
    return Replacement(work, kind.lower(), replaced, left)


__all__ = ["ACTIVATIONS", "Replacement", "replace_activations"]

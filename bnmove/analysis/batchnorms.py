"""What counts as a BatchNorm: any ``_BatchNorm`` subclass (``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, the lazy variants), a BN frozen into a fixed affine map (recognised by what
it computes), and the functional ``F.batch_norm``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Functional batch norm; fx records calls to it as ``call_function`` nodes.
FUNCTIONAL_BATCH_NORM: tuple[Callable[..., Any], ...] = (F.batch_norm,)


def is_batchnorm_module(module: nn.Module) -> bool:
    """True for every BatchNorm flavour: 1d/2d/3d, Sync, Lazy, subclasses, and frozen BNs."""
    return isinstance(module, _BatchNorm) or is_frozen_batchnorm(module)


_FROZEN_BUFFERS = {"weight", "bias", "running_mean", "running_var"}
_FROZEN: dict[tuple[type, int], bool] = {}


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm frozen into a fixed affine map (torchvision's ``FrozenBatchNorm2d`` and its kin).

    Recognised by its state (buffers ``weight``, ``bias``, ``running_mean``,
    ``running_var`` and an ``eps``; no parameters, no children) and by what it
    computes, checked once per class and width on a probe: ``(x - mean) /
    sqrt(var + eps) * weight + bias`` per channel (dim 1). It never normalises
    by batch statistics, in train mode either.
    """
    if isinstance(module, _BatchNorm) or set(module._buffers) != _FROZEN_BUFFERS or module._parameters:
        return False
    if module._modules or not isinstance(getattr(module, "eps", None), float):
        return False
    mean = module._buffers["running_mean"]
    if mean is None or mean.dim() != 1 or not mean.is_floating_point():
        return False
    key = (type(module), mean.numel())
    if key not in _FROZEN:
        _FROZEN[key] = _computes_frozen_bn(module, mean.numel())
    return _FROZEN[key]


def _computes_frozen_bn(module: nn.Module, channels: int) -> bool:
    probe = type(module).__new__(type(module))
    # A shallow copy with probe buffers and no hooks: the user's module and hooks see nothing.
    probe.__dict__.update(
        {k: (OrderedDict() if "hook" in k else v) for k, v in module.__dict__.items() if k != "_buffers"}
    )
    gen = torch.Generator().manual_seed(0)
    buffers = {
        "weight": torch.rand(channels, generator=gen) + 0.5,
        "bias": torch.randn(channels, generator=gen),
        "running_mean": torch.randn(channels, generator=gen),
        "running_var": torch.rand(channels, generator=gen) + 0.5,
    }
    probe.__dict__["_buffers"] = dict(buffers)
    x = torch.randn(2, channels, 3, 3, generator=gen)
    try:
        with torch.no_grad():
            got = probe(x)
    except Exception:
        return False
    view = (1, channels, 1, 1)
    scale = buffers["weight"] / (buffers["running_var"] + float(module.eps)).sqrt()  # type: ignore[arg-type]
    want = (x - buffers["running_mean"].view(view)) * scale.view(view) + buffers["bias"].view(view)
    return isinstance(got, torch.Tensor) and got.shape == x.shape and torch.allclose(got, want, atol=1e-5)


def bn_channels(module: nn.Module) -> int:
    """The number of channels a BatchNorm (plain or frozen) normalises."""
    features = getattr(module, "num_features", None)
    if isinstance(features, int):
        return features
    return int(module._buffers["running_mean"].numel())  # type: ignore[union-attr]


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm whose forward is torch's own (no fused activation or extras), or a frozen BN."""
    if is_frozen_batchnorm(module):
        return True
    if not is_batchnorm_module(module):
        return False
    forward = type(module).forward
    return forward is _BatchNorm.forward or type(module).__module__.startswith("torch.nn")


def is_functional_batchnorm(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in FUNCTIONAL_BATCH_NORM


def has_eval_map(module: nn.Module) -> bool:
    """A plain BatchNorm with running statistics: in eval mode a per-channel affine map, which a
    layer beside it can take (deployment's folds ask this of every BN they touch)."""
    return is_plain_batchnorm(module) and getattr(module, "running_mean", None) is not None

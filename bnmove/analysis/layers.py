"""The affine layers a BatchNorm folds into, and whether a fold is exact.

torch's Conv/ConvTranspose/Linear are known by their attributes. Library
subclasses with a forward of their own (efficientnet_pytorch's
``Conv2dStaticSamePadding``, timm's ``Conv2dSame``: pad, then ``F.conv2d``
with the module's weight) are checked on a probe: a copy with the folded
weight and bias must compute what the fold promises, for each direction.
"""

from __future__ import annotations

import copy
import weakref
from typing import cast

import torch
from torch import nn

from ..core.affine import ChannelAffine

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: layers a BN folds into; a ChannelAffine left by an earlier move absorbs one exactly both ways
AFFINE_LAYERS = (*_CONV, *_CONV_T, nn.Linear, ChannelAffine)


def torch_forward(module: nn.Module) -> bool:
    """The module runs torch's own forward: a torch layer, or a library subclass that only changes
    ``__init__`` (HF's ``EfficientNetDepthwiseConv2d(nn.Conv2d)``)."""
    forward = getattr(type(module), "forward", None)
    name = getattr(forward, "__module__", "") or ""
    return name.startswith("torch.nn") or name.startswith("torch.ao.nn")


def out_channels(layer: nn.Module) -> int:
    if isinstance(layer, ChannelAffine):
        return cast("torch.Tensor", layer.weight).numel()
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return int(layer.out_channels)  # type: ignore[arg-type]


def in_channels(layer: nn.Module) -> int:
    if isinstance(layer, ChannelAffine):
        return cast("torch.Tensor", layer.weight).numel()
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return int(layer.in_channels)  # type: ignore[arg-type]


def _probe_input(layer: nn.Module, side: int = 9) -> torch.Tensor:
    weight = cast("torch.Tensor", layer.weight)
    gen = torch.Generator().manual_seed(0)
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (3, in_channels(layer))
    else:
        dims = weight.dim() - 2
        shape = (2, in_channels(layer), *([side] * dims))
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _probe_fold(layer: nn.Module, backward: bool) -> bool:
    """Does a float64 copy with the folded parameters compute what the fold promises?"""
    from ..core import bn_math  # the fold's own formulas, checked here against the layer's forward

    probe = cast("nn.Conv2d", copy.deepcopy(layer).double().eval())
    x = _probe_input(probe)
    channels = out_channels(probe) if backward else in_channels(probe)
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    b = torch.randn(channels, generator=gen, dtype=torch.float64)
    transposed = isinstance(probe, _CONV_T)
    groups = int(getattr(probe, "groups", 1))
    fold = bn_math.fold_into_preceding if backward else bn_math.fold_into_following
    try:
        with torch.no_grad():
            if backward:
                y = probe(x)
                view = (1, -1, *([1] * (y.dim() - 2)))
                want = y * a.view(view) + b.view(view)
            else:
                view = (1, -1, *([1] * (x.dim() - 2)))
                want = probe(x * a.view(view) + b.view(view))
            weight, bias = fold(probe.weight, probe.bias, a, b, transposed=transposed, groups=groups)
            probe.weight.copy_(weight)
            if probe.bias is None:
                probe.bias = nn.Parameter(bias)
            else:
                probe.bias.copy_(bias)
            got = probe(x)
    except Exception:
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, atol=1e-9)


_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def custom_affine_layer(module: nn.Module) -> bool:
    """A Conv/Linear subclass with its own forward that a BN still folds into exactly (backward)."""
    if not isinstance(module, AFFINE_LAYERS) or torch_forward(module) or isinstance(module, ChannelAffine):
        return False
    if module not in _PROBED:
        _PROBED[module] = _probe_fold(module, backward=True)
    return _PROBED[module]


def zero_padded_conv(layer: nn.Module) -> bool:
    """A torch Conv1d/2d/3d that pads with zeros: a BN folds into it exactly with a border correction."""
    if not isinstance(layer, _CONV) or not torch_forward(layer) or layer.padding_mode != "zeros":
        return False
    if layer.padding == "same":
        return any(k != 1 for k in layer.kernel_size)
    return isinstance(layer.padding, tuple) and any(p != 0 for p in layer.padding)


def forward_fold_blocker(layer: nn.Module) -> str | None:
    """Why folding a BN forward into ``layer`` would not be exact, or None."""
    if isinstance(layer, ChannelAffine):
        return None
    if not torch_forward(layer):
        if _probe_fold(layer, backward=False):
            return None
        return f"its own forward ({type(layer).__name__}) pads or reshapes its input, which the BN's shift does not pass"
    if isinstance(layer, _CONV):
        if layer.padding_mode != "zeros":
            return None  # reflect/replicate/circular pad with copies of the input: pad(a·u+b) = a·pad(u)+b
        padding = layer.padding
        if padding == "same" and any(k != 1 for k in layer.kernel_size):
            return "it pads its input ('same'), and padding does not commute with the BN's shift"
        if isinstance(padding, tuple) and any(p != 0 for p in padding):
            return "it pads its input, and padding does not commute with the BN's shift"
        return None
    if isinstance(layer, _CONV_T):
        pointwise = all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
        unpadded = all(p == 0 for p in layer.padding) and all(p == 0 for p in layer.output_padding)  # type: ignore[union-attr]
        if not (pointwise and unpadded):
            return "a transposed conv spreads the BN's shift unevenly over its output"
        return None
    return None


__all__ = [
    "AFFINE_LAYERS",
    "custom_affine_layer",
    "forward_fold_blocker",
    "in_channels",
    "out_channels",
    "torch_forward",
    "zero_padded_conv",
]

"""Which fold a layer takes, by (layer kind, direction): one table, as ``torch.ao``'s fuser mapping.

A BatchNorm in eval mode is the per-channel map ``A(z) = a·z + b``
(``core.affine.affine_map``). It folds into a layer beside it:

* ``backward``, the map after the layer (``L → A``): ``L′(x) = a·L(x) + b``, so
  ``W′ = a·W`` per output channel and ``c′ = a·c + b`` (``bn_math.fold_into_preceding``);
* ``forward``, the map before the layer (``A → N``): ``N′(z) = N(a·z + b)``, so
  ``W′ = W·a`` per input channel and ``c′ = c + Σ W·b`` over taps and input
  channels (``bn_math.fold_into_following``). Exact for a Linear, an unpadded
  Conv or a pointwise ConvTranspose; whether a site may fold forward is the
  legality of `bnmove.analysis.folds.forward_fold`.

A [`ChannelAffine`][bnmove.core.affine.ChannelAffine] (a map kept by an earlier move)
composes with ``A`` either way: a diagonal times a diagonal. Subclasses take
their base's fold (looked up along the MRO), so timm's ``Conv2dSame`` folds as a
``Conv2d``; ``analysis.layers`` checks such a subclass on a probe first.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal, cast

import torch
from torch import nn

from ..analysis.layers import AFFINE_LAYERS
from ..core import bn_math
from ..core.affine import ChannelAffine
from ..core.modules import submodule

Direction = Literal["backward", "forward"]
#: ``fold(layer, a, b, inplace=False) -> (weight', bias')``, the bias in float64; ``inplace``: a
#: Conv's or Linear's own weight is scaled (and returned), sparing a temporary the size of it
Fold = Callable[..., tuple[torch.Tensor, torch.Tensor]]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _weights(
    layer: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    direction: Direction,
    transposed: bool,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    fold = bn_math.fold_into_preceding if direction == "backward" else bn_math.fold_into_following
    weight = cast(torch.Tensor, layer.weight)
    bias = cast("torch.Tensor | None", layer.bias)
    device = weight.device
    return fold(
        weight,
        bias,
        a.to(device),
        b.to(device),
        transposed=transposed,
        groups=int(getattr(layer, "groups", 1)),
        dtype=torch.promote_types(weight.dtype, torch.float32),
        inplace=inplace,
    )


def _diagonal(
    layer: nn.Module, a: torch.Tensor, b: torch.Tensor, *, direction: Direction, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    affine = cast(ChannelAffine, layer)
    w, c = affine.weight.detach().double().cpu(), affine.bias.detach().double().cpu()
    a, b = a.double().cpu(), b.double().cpu()
    if direction == "backward":  # A(L(x)) = a·(w·x + c) + b
        return a * w, a * c + b
    return w * a, w * b + c  # L(A(z)) = w·(a·z + b) + c


def _table() -> dict[tuple[type[nn.Module], Direction], Fold]:
    table: dict[tuple[type[nn.Module], Direction], Fold] = {}
    directions: tuple[Direction, ...] = ("backward", "forward")
    for direction in directions:
        for kind in (*_CONV, nn.Linear, *_CONV_T):
            transposed = kind in _CONV_T
            table[(kind, direction)] = partial(_weights, direction=direction, transposed=transposed)
        table[(ChannelAffine, direction)] = partial(_diagonal, direction=direction)
    return table


#: (layer kind, direction) -> the fold; a subclass takes its nearest base's entry
FOLDS = _table()


def fold_for(layer: nn.Module, direction: Direction) -> Fold:
    """The table's fold for ``layer`` (its own class or the nearest base the table names; a kept
    affine, a GraphModule, by what it computes)."""
    if isinstance(layer, ChannelAffine):
        return FOLDS[(ChannelAffine, direction)]
    for kind in type(layer).__mro__:
        fold = FOLDS.get((kind, direction))
        if fold is not None:
            return fold
    raise LookupError(f"no {direction} fold for {type(layer).__name__}")


def _set_weight_bias(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    w = cast(torch.Tensor, layer.weight)
    with torch.no_grad():
        if not _same_memory(weight, w):  # a fold in place has written it already
            w.copy_(weight.to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype))
        else:
            cast(torch.Tensor, layer.bias).copy_(bias.to(w.dtype))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr(), a.dtype, a.shape, a.stride()) == (b.data_ptr(), b.dtype, b.shape, b.stride())


def fold_map(
    root: nn.Module, a: torch.Tensor, b: torch.Tensor, layer_name: str, direction: Direction
) -> None:
    """Fold the per-channel map ``a·z + b`` into the layer at ``layer_name``, in place."""
    layer = submodule(root, layer_name)
    assert isinstance(layer, AFFINE_LAYERS), f"{layer_name} takes no fold"
    _set_weight_bias(layer, *fold_for(layer, direction)(layer, a, b, inplace=True))

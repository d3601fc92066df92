"""The exact fold of a per-channel affine map into a zero-padded convolution.

With ``BN(u) = a·u + b`` per input channel and ``pad0`` the conv's zero padding,

    conv_W(pad0(a·u + b)) = conv_{W·a}(pad0(u)) + conv_W(pad0(b·1))

The first term is the conv with its weights scaled per input channel. The second
does not depend on the input at all, only on its spatial size: in the interior it
is the ordinary folded bias ``Σ W·b``, within the kernel's reach of a border it
is less, because there the kernel also sees padding zeros that were never
shifted by ``b``. `BorderCorrectedConv` adds that map. It computes it from
the input's shape at each call, so it is exact for every size; an export with
fixed spatial sizes (bnmove's exports fix every dimension but the batch) turns it
into one constant that onnxruntime folds at load time, leaving ``Conv`` + ``Add``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import bn_math


class BorderCorrectedConv(nn.Module):
    """``conv(x) + conv_{shift_weight}(pad0(1))``: a zero-padded conv with a per-channel affine folded in.

    Args:
        conv: the conv with the affine's scale already folded into its weights (bias unchanged).
        shift_weight: the original weights scaled per input channel by the affine's shift ``b``.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, shift_weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.shift_weight: torch.Tensor
        self.register_buffer("shift_weight", shift_weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = x.new_ones((1, self.conv.in_channels, *x.shape[2:]))
        correction = self.conv._conv_forward(ones, self.shift_weight.to(x.dtype), None)
        return self.conv(x) + correction


def border_corrected(
    conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: torch.Tensor, b: torch.Tensor
) -> BorderCorrectedConv:
    """``conv`` after ``BN(u) = a·u + b``, as one exact `BorderCorrectedConv` (``conv`` is not modified)."""
    groups = int(conv.groups)
    zeros = torch.zeros_like(a)
    scaled, _ = bn_math.fold_into_following(conv.weight, None, a, zeros, groups=groups)
    shifted, _ = bn_math.fold_into_following(conv.weight, None, b, zeros, groups=groups)
    new = type(conv)(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(scaled)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    new.train(conv.training)
    return BorderCorrectedConv(new, shifted.to(conv.weight.dtype))


def absorb_following(corrected: BorderCorrectedConv, a: torch.Tensor, b: torch.Tensor) -> None:
    """Fold ``BN(z) = a·z + b`` that follows ``corrected`` into it, in place.

    ``a·(conv_W(x) + c) + b = conv_{a·W}(x) + a·c + b``: the output channels' weights and bias take
    the fold every conv takes, and the correction map ``c``, linear in ``shift_weight``, scales with
    ``a`` per output channel. A runtime fuses a BN only into a Conv that feeds it directly; after a
    border-corrected conv an ``Add`` stands between them, so bnmove folds it instead.
    """
    conv = corrected.conv
    groups = int(conv.groups)
    device = conv.weight.device
    weight, bias = bn_math.fold_into_preceding(
        conv.weight, conv.bias, a.to(device), b.to(device), groups=groups
    )
    shift, _ = bn_math.fold_into_preceding(
        corrected.shift_weight, None, a.to(device), torch.zeros_like(a).to(device), groups=groups
    )
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is None:
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(bias.to(conv.bias.dtype))
        corrected.shift_weight.copy_(shift.to(corrected.shift_weight.dtype))


__all__ = ["BorderCorrectedConv", "absorb_following", "border_corrected"]

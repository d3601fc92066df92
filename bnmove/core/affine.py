"""The per-channel affine map an exact move keeps where no layer can absorb the BN's.

BN in eval mode is ``A(z) = a*z + b`` per channel plus, in train mode, a
normalisation. Moving BatchNorm across the activation moves the normalisation;
where no Conv/Linear beside the pair can take ``A`` (a BN fed by an add or a
concatenation, or before a padded conv), ``A`` stays on its side as this module
(learnable weight and bias, no statistics), and the new BN, the identity in
eval mode with the true statistics of its input, goes to the other side:

* before -> after: ``X -> BN -> f`` becomes ``X -> A -> f -> BN'``;
* after -> before: ``f -> BN -> N`` becomes ``BN' -> f -> A -> N``.

Eval outputs are unchanged for every activation. It exports to ONNX as Mul
and Add; a later move folds a BN into it exactly, like into a Linear.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """``y = weight[c] * x + bias[c]`` over channel dimension 1, for inputs of any rank >= 2."""

    def __init__(
        self, num_features: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return str(self.num_features)


__all__ = ["ChannelAffine"]

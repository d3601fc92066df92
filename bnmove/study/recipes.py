"""Training recipes for ``bnmove experiment``: the optimiser, its schedule and the regularisers.

* ``adam``: Adam at a constant learning rate (default 1e-3), nothing else: quick, the default.
* ``sgd``: the usual CIFAR ResNet recipe: SGD with momentum 0.9 and Nesterov, weight decay 5e-4
  on weights only (not on BatchNorm/affine parameters or biases), linear warm-up over the first
  5% of steps, then cosine decay to zero; default learning rate 0.1.
* ``adamw``: AdamW with weight decay 0.05 on weights only, the same warm-up and cosine decay;
  default learning rate 1e-3.

Every recipe takes ``label_smoothing`` and ``augment`` (random crop with zero padding of an
eighth of the side, and horizontal flips, for image batches), drawn from a generator seeded per
seed and epoch, so every placement of a seed sees the same augmented batches.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BnmoveError

RECIPES = ("adam", "sgd", "adamw")
_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1, "adamw": 1e-3}
_DEFAULT_DECAY = {"adam": 0.0, "sgd": 5e-4, "adamw": 0.05}
#: fraction of all steps spent warming up (sgd, adamw)
WARMUP = 0.05


@dataclass(frozen=True)
class Recipe:
    name: str = "adam"
    lr: float | None = None
    weight_decay: float | None = None
    label_smoothing: float = 0.0
    augment: bool = False

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise BnmoveError(f"unknown recipe {self.name!r}; choose from {', '.join(RECIPES)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise BnmoveError("the learning rate must be positive")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise BnmoveError("weight decay must not be negative")
        if not 0 <= self.label_smoothing < 1:
            raise BnmoveError("label smoothing must be in [0, 1)")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.name]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else _DEFAULT_DECAY[self.name]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lr": self.learning_rate, "weight_decay": self.decay}

    def describe(self) -> str:
        parts = [f"{self.name} lr {self.learning_rate:g}"]
        if self.decay:
            parts.append(f"weight decay {self.decay:g}")
        if self.name != "adam":
            parts.append("warm-up + cosine")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.augment:
            parts.append("crop + flip")
        return ", ".join(parts)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The recipe's optimiser; weight decay only on weights (not on norm/affine parameters or biases)."""
        decay, no_decay = split_decay(model)
        groups = [{"params": decay, "weight_decay": self.decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        lr = self.learning_rate
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        if self.name == "adamw":
            return torch.optim.AdamW(groups, lr=lr)
        return torch.optim.Adam(groups, lr=lr)

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        """Per-step learning-rate factors: warm-up then cosine for sgd/adamw, constant for adam."""
        if self.name == "adam":
            return None
        warmup = max(1, round(WARMUP * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def loss(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, target, label_smoothing=self.label_smoothing)


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(weights, the rest)``: parameters of modules with running statistics or of one dimension
    (norm scales and shifts, biases, per-channel affines) are not decayed."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (rest if id(param) in no_decay or param.dim() <= 1 else decay).append(param)
    return decay, rest


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by an eighth of the side (at least 1), and horizontal flip,
    per sample, for ``(N, C, H, W)`` batches; other shapes pass unchanged."""
    if x.dim() != 4:
        return x
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    index = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


__all__ = ["RECIPES", "WARMUP", "Recipe", "augment_batch", "split_decay"]

"""Models for the tests, each with the pairs a reader can count by eye.

``ZOO`` maps a case name to ``(factory, input shape, expected)`` where
``expected`` counts pairs by placement and how many can move exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (negative gammas too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                if isinstance(m.running_mean, nn.parameter.UninitializedBuffer):
                    continue
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) * 3 - 1.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
        for name, buf in model.named_buffers():
            if name.endswith(("rm", "rv")):
                buf.copy_(torch.rand(buf.shape, generator=g) + (0.5 if name.endswith("rv") else -0.5))
    return model


# -- building blocks -----------------------------------------------------------


class ConvBnAct(nn.Module):
    """conv -> BN -> act (BN before)."""

    def __init__(self, cin: int, cout: int, act: nn.Module, bn: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = bn(cout)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ConvActBn(nn.Module):
    """conv -> act -> BN -> 1x1 conv (BN after; exact back-move into the 1x1)."""

    def __init__(self, cin: int, cout: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = act
        self.bn = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bn(self.act(self.conv(x))))


class Head(nn.Module):
    def __init__(self, c: int, classes: int = 5) -> None:
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module called twice, BN -> add -> ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem, two stages of BasicBlocks, head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.layer2 = nn.Sequential(BasicBlock(8))
        self.fc = nn.Linear(8, classes)

    @property
    def num_features(self) -> int:  # a property, as timm models have
        return self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer2(self.layer1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style fused norm+act: a BatchNorm2d subclass whose forward also activates."""

    def __init__(self, num_features: int, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class FusedNet(nn.Module):
    def __init__(self, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(6, act_layer)
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn1(self.conv(x)))


class CheckedNet(nn.Module):
    """Top-level forward that fx cannot trace (an input check on a shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(ConvBnAct(3, 8, nn.ReLU()), ConvBnAct(8, 8, nn.GELU()))
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:
            raise ValueError("expected 3 channels")
        if x.sum() > 1e9:  # data-dependent branch
            x = x / 2
        return self.head(self.features(x))


class MLP(nn.Module):
    """Linear + BatchNorm1d both ways: BN before ReLU, then ReLU -> BN -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.SiLU()
        self.bn2 = nn.BatchNorm1d(12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.fc1(x)))
        return self.fc3(self.bn2(self.act2(self.fc2(x))))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.ELU()
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(6)
        self.conv3 = nn.Conv1d(6, 6, 3)  # unpadded: exact target for moving bn2 back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.conv3(self.bn2(F.softplus(self.conv2(x)))).mean(-1)


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm3d(4)
        self.conv2 = nn.ConvTranspose3d(4, 4, 2, stride=2, groups=2)
        self.bn2 = nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.bn(self.conv(x)))
        return torch.tanh(self.bn2(self.conv2(x))).mean((2, 3, 4))


class InplaceSecondUser(nn.Module):
    """An in-place ReLU whose input is also read by the residual add: must not move."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.proj(self.bn(F.relu(y, inplace=True)))
        return z + y


class PreActBlock(nn.Module):
    """Pre-activation residual: add -> BN -> act -> conv (no affine layer before the BN)."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = act
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.act(self.bn(x)))


class PreActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = nn.Sequential(PreActBlock(6, nn.ReLU()), PreActBlock(6, nn.Mish()))
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class NoBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FunctionalBN(nn.Module):
    """F.batch_norm with the model's own buffers, then a tensor-method activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.conv(x), self.rm, self.rv, None, None, False, 0.1, 1e-5)
        return self.fc(x.sigmoid().mean((2, 3)))


class Nested(nn.Module):
    """Pairs two levels down, across Sequential and custom containers, grouped convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardswish()),
            ConvActBn(8, 8, nn.LeakyReLU(0.1)),
            nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
        )
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage(x))


class DenseTail(nn.Module):
    """torchvision's DenseNet: ``features`` ends in a BN, ``F.relu`` is called by the top-level forward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class ConvNorm(nn.Module):
    """A child ending in its BN; the activation is its parent's to call."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class PatchMerging(nn.Module):
    """timm's efficientvit_m0: ConvNorm children and one activation module the parent calls twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, 6)
        self.conv2 = ConvNorm(6, 6)
        self.act = nn.ReLU()
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv2(self.act(self.conv1(x)))))


class ConvAct(nn.Module):
    """A child ending in a functional activation; its parent normalises what it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv(x))


class NormAfterChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = ConvAct()
        self.bn = nn.BatchNorm2d(6)
        self.proj = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj(self.bn(self.block(x))).mean((2, 3)))


class DropBlock(nn.Module):
    """efficientnet_pytorch's MBConvBlock: one activation module called twice in a forward that
    branches on a float argument (``if drop_rate:``), which torch.fx cannot trace on its own, and
    on ``self.training`` (dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.swish = nn.SiLU()

    def forward(self, x: torch.Tensor, drop_rate: float | None = None) -> torch.Tensor:
        x = self.swish(self.bn1(self.conv1(x)))
        x = self.swish(self.bn2(self.conv2(x)))
        if drop_rate:
            x = F.dropout(x, drop_rate, self.training)
        return x


class DropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = DropBlock()
        self.head = Head(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x, drop_rate=0.2))


class Scaled(nn.Module):
    """Branches on a float argument (``if scale:``), so bnmove specialises the forward to the value its
    parent passes; a functional ReLU makes the move a rewrite of this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor, scale: float = 0.0) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        if scale:
            out = out * scale
        return out


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Scaled()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x, 0.5))


class Tree(nn.Module):
    """timm's DlaTree in miniature: ``if shortcut is None`` in the forward that calls the pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        if shortcut is None:
            shortcut = x
        return out + shortcut


class Forest(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Tree(), Tree()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x), x)


@dataclass(frozen=True)
class Case:
    factory: Callable[[], nn.Module]
    shape: tuple[int, ...]
    before: int  # pairs with BN before the activation
    after: int  # pairs with BN after the activation
    lone: int = 0  # BNs with no adjacent activation
    exact: int = 0  # pairs that can move exactly (folded or keeping the BN's affine)
    immovable: int = 0
    kept: int = 0  # of those, pairs whose exact move keeps the affine (no layer absorbs it)


ZOO: dict[str, Case] = {
    "resnet": Case(TinyResNet, (2, 3, 8, 8), before=4, after=0, lone=3, exact=4),
    "mlp": Case(MLP, (4, 10), before=1, after=1, exact=2),
    "conv1d": Case(Conv1dNet, (2, 4, 9), before=1, after=1, exact=2),
    "conv3d": Case(Conv3dNet, (2, 2, 4, 4, 4), before=2, after=0, exact=2),
    "fused": Case(FusedNet, (2, 3, 8, 8), before=1, after=0, exact=1),
    "untraceable-top": Case(CheckedNet, (2, 3, 8, 8), before=2, after=0, exact=2),
    "inplace-second-user": Case(InplaceSecondUser, (2, 3, 8, 8), before=0, after=1, immovable=1),
    "preact": Case(PreActNet, (2, 3, 8, 8), before=2, after=0, exact=2, kept=2),
    "nested": Case(Nested, (2, 3, 8, 8), before=2, after=1, exact=3),
    "functional-bn": Case(FunctionalBN, (2, 3, 8, 8), before=1, after=0, exact=0),
    "no-bn": Case(NoBN, (2, 3, 8, 8), before=0, after=0),
    "across-function": Case(DenseTail, (2, 3, 8, 8), before=1, after=0, exact=1),
    "across-shared-module": Case(PatchMerging, (2, 3, 8, 8), before=2, after=0, exact=2),
    "across-child-activation": Case(NormAfterChild, (2, 3, 8, 8), before=0, after=1, exact=1),
    "branching-forward": Case(DropNet, (2, 3, 8, 8), before=2, after=0, exact=2),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A zoo model in eval mode with randomised BN state, and a seeded input."""
    case = ZOO[name]
    torch.manual_seed(seed)
    model = case.factory()
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1))
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        with torch.no_grad():
            model.eval()(x)
    return randomize_bn(model, seed).eval(), (x,)

"""Sample model definitions with BatchNorm before and after activations.

Each is written the way popular model code writes it, so bnmove meets the
patterns it meets in the wild:

* ``resnet``: torchvision-style ResNet (BasicBlock, one ReLU module called twice,
  BN -> add -> ReLU, conv+BN downsample shortcuts).
* ``mobilenet``: MobileNetV3-style inverted residuals with depthwise convs and Hardswish.
* ``preact_resnet``: pre-activation residual blocks (add -> BN -> ReLU -> conv).
* ``mlp``: Linear + BatchNorm1d, with BN both before and after activations.
* ``digits_net``, ``digits_resnet``: small models for 1x8x8 digit images (``--data digits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 -> 3x3 -> 1x1 convs, each BN before ReLU (ResNet-50's block)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision-style ResNet: ``blocks=(2, 2, 2, 2)`` is ResNet-18's layout; with
    ``bottleneck=True``, ``(3, 4, 6, 3)`` and ``stem_stride=2`` it is ResNet-50's."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        in_channels: int = 3,
        bottleneck: bool = False,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if stem_stride == 1:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:  # ImageNet stem: 7x7 stride 2, then max-pool (224 -> 56)
            self.conv1 = nn.Conv2d(in_channels, width, 7, stem_stride, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1) if stem_stride != 1 else nn.Identity()
        layers: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            stage: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if bottleneck:
                    stage.append(Bottleneck(cin, planes, stride))
                    cin = planes * Bottleneck.expansion
                else:
                    stage.append(BasicBlock(cin, planes, stride))
                    cin = planes
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            act(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNet(nn.Module):
    """MobileNetV3-style: depthwise separable inverted residuals with Hardswish."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        in_channels: int = 3,
        settings: tuple[tuple[int, int, int], ...] = ((1, 16, 1), (4, 24, 2), (3, 24, 1), (4, 40, 2)),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish()
        )
        blocks: list[nn.Module] = []
        cin = width
        for expand, cout, stride in settings:
            blocks.append(InvertedResidual(cin, cout, expand, stride, nn.Hardswish))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(cin, cin * 4, 1, bias=False), nn.BatchNorm2d(cin * 4), nn.Hardswish()
        )
        self.classifier = nn.Linear(cin * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PreActBlock(nn.Module):
    """``x + conv2(f(BN2(conv1(f(BN1(x))))))``, or with ``convs=1`` ``x + conv1(f(BN1(x)))``.

    With one conv every BN is fed by the residual stream, so none can be moved exactly.
    """

    def __init__(self, c: int, act: type[nn.Module] = nn.ReLU, convs: int = 2) -> None:
        super().__init__()
        if convs not in (1, 2):
            raise ValueError(f"convs must be 1 or 2, not {convs}")
        self.bn1 = nn.BatchNorm2d(c)
        self.act1 = act()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        if convs == 2:
            self.bn2 = nn.BatchNorm2d(c)
            self.act2 = act()
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.bn1(x)))
        if hasattr(self, "conv2"):  # not a stored flag: blocks pickled before `convs` existed load too
            out = self.conv2(self.act2(self.bn2(out)))
        return x + out


class PreActResNet(nn.Module):
    """Pre-activation ResNet: add -> BN -> act -> conv, so no affine layer precedes most BNs.

    ``convs`` per block: 2 (a BN after the first conv can move exactly) or 1 (none can).
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        blocks: int = 3,
        in_channels: int = 3,
        act: type[nn.Module] = nn.ReLU,
        convs: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[PreActBlock(width, act, convs) for _ in range(blocks)])
        self.bn = nn.BatchNorm2d(width)
        self.act = act()
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MLP(nn.Module):
    """Linear + BatchNorm1d: BN before GELU in the first layer, after it in the second."""

    def __init__(self, in_features: int = 64, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.GELU()
        self.bn2 = nn.BatchNorm1d(hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.fc1(x.flatten(1))))
        return self.fc3(self.bn2(self.act2(self.fc2(x))))


class DigitsNet(nn.Module):
    """A small CNN for 1x8x8 digit images with BatchNorm on both sides of activations.

    conv -> BN -> ReLU and conv -> BN -> Hardswish (BN before), conv -> GELU -> BN
    -> padded conv (BN after, not exactly movable back), and a Linear -> ReLU ->
    BatchNorm1d -> Linear head (BN after, exactly movable).
    """

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.Hardswish(),
        )
        self.mix = nn.Conv2d(2 * width, 2 * width, 1)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(2 * width)
        self.conv = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width, 64)
        self.relu = nn.ReLU()
        self.bn_fc = nn.BatchNorm1d(64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        x = self.conv(self.bn(self.act(self.mix(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(self.bn_fc(self.relu(self.fc1(x))))


def digits_net(num_classes: int = 10) -> DigitsNet:
    return DigitsNet(num_classes)


def digits_resnet(num_classes: int = 10) -> ResNet:
    """A two-stage ResNet for 1x8x8 digit images."""
    return ResNet(num_classes, width=16, blocks=(1, 1), in_channels=1)


def resnet(num_classes: int = 10, width: int = 16) -> ResNet:
    return ResNet(num_classes, width)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50's layout (Bottleneck blocks 3-4-6-3, ImageNet stem, 25.6M parameters)."""
    return ResNet(num_classes, width=64, blocks=(3, 4, 6, 3), bottleneck=True, stem_stride=2)


def bottleneck_resnet(num_classes: int = 10) -> ResNet:
    """A small Bottleneck ResNet for CPU tests and benchmarks."""
    return ResNet(num_classes, width=16, blocks=(1, 1, 1), bottleneck=True)


def mobilenet(num_classes: int = 10) -> MobileNet:
    return MobileNet(num_classes)


def preact_resnet(num_classes: int = 10, act: str = "relu") -> PreActResNet:
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish, "tanh": nn.Tanh}
    return PreActResNet(num_classes, act=acts[act.lower()])


def mlp(in_features: int = 64, num_classes: int = 10) -> MLP:
    return MLP(in_features, num_classes=num_classes)


#: name -> (factory, example input shape)
SAMPLES = {
    "digits_net": (digits_net, (1, 1, 8, 8)),
    "digits_resnet": (digits_resnet, (1, 1, 8, 8)),
    "resnet": (resnet, (1, 3, 32, 32)),
    "mobilenet": (mobilenet, (1, 3, 32, 32)),
    "preact_resnet": (preact_resnet, (1, 3, 32, 32)),
    "mlp": (mlp, (1, 64)),
}


__all__ = [
    "MLP",
    "SAMPLES",
    "BasicBlock",
    "Bottleneck",
    "DigitsNet",
    "InvertedResidual",
    "MobileNet",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "bottleneck_resnet",
    "digits_net",
    "digits_resnet",
    "mlp",
    "mobilenet",
    "preact_resnet",
    "resnet",
    "resnet50",
]

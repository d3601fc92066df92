"""Speed of convert against torch.fx tracing plus two forward passes, in both directions.

For each model, side by side in every round: the floor (``symbolic_trace`` plus two forward
passes, the verification's own cost), ``convert`` of the original to ``after`` (exact), and
``convert`` of that after-variant back to ``before`` (exact). Prints each direction's median
over the rounds as a ratio to the floor's median (issue 29's target: <= 1.5x, none above 2x).

An after-variant fresh from ``convert`` holds BN′s that are the identity in eval mode, which go
back across their activations alone (the ``move-identity`` rule). A model trained in the after
placement holds BNs that compute something, whose maps fold or stay as kept affines: the last
column converts such a model (the after-variant with every BN's statistics and affine drawn
again, as training leaves them) back to ``before``, beside the others, for what it costs.

Models built here, always: a 150-block conv-BN-ReLU ``Sequential`` (ResNet-like stem, 224 px)
and a DenseNet-like model (layers held in attributes, each reading the concatenation of every
earlier output; a BN outside any Sequential). With torchvision and timm installed (the scratch
environment ``../shared/tools/thirdparty-venv.sh`` builds): torchvision resnet50, densenet121,
mobilenet_v3_small and timm efficientnet_b0, convnext_tiny, random weights, 224 px, batch 1.

    python benchmarks/bench_convert.py [--rounds 5] [--only NAME] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from torch import fx, nn

import bnmove


def make_cnn(blocks: int, width: int = 32, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """A ResNet-like stem (224 -> 56) then ``blocks`` conv -> BN -> act blocks."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        act(),
        nn.MaxPool2d(3, 2, 1),
    ]
    for _ in range(blocks - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    torch.manual_seed(0)
    return _trained_like(nn.Sequential(*layers))


class DenseLayer(nn.Module):
    """concat -> BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv, as torchvision's DenseNet."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.relu1(self.norm1(torch.cat(features, 1)))
        return self.conv2(self.relu2(self.norm2(self.conv1(x))))


class DenseNetLike(nn.Module):
    """A stem, then ``layers`` DenseLayers held in attributes (``layer0``, ``layer1``, …)."""

    def __init__(self, layers: int = 48, growth: int = 12) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 2 * growth, 7, 4, 3, bias=False), nn.BatchNorm2d(2 * growth), nn.ReLU()
        )
        self.layers = layers
        for i in range(layers):
            setattr(self, f"layer{i}", DenseLayer(2 * growth + i * growth, growth))
        self.head = nn.Linear(2 * growth + layers * growth, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for i in range(self.layers):
            features.append(getattr(self, f"layer{i}")(features))
        return self.head(torch.cat(features, 1).mean((2, 3)))


def _trained_like(model: nn.Module) -> nn.Module:
    """Every BN's statistics and affine drawn per channel, as training leaves them: a never-trained
    BN (weight 1, bias 0) makes the after-variant's BN′s all alike, which a solve does once."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def models() -> Iterator[tuple[str, Callable[[], nn.Module]]]:
    yield "Sequential CNN, 150 blocks", lambda: make_cnn(150)
    yield "DenseNet-like, 48 layers", lambda: _trained_like(DenseNetLike(48))
    if importlib.util.find_spec("torchvision"):
        import torchvision.models as tvm

        for name in ("resnet50", "densenet121", "mobilenet_v3_small"):
            yield f"torchvision {name}", lambda name=name: _trained_like(getattr(tvm, name)())
    if importlib.util.find_spec("timm"):
        import timm

        for name in ("efficientnet_b0", "convnext_tiny"):
            yield f"timm {name}", lambda name=name: _trained_like(timm.create_model(name))


def floor(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fx.symbolic_trace(model)
    with torch.no_grad():
        model(x)
        model(x)
    return time.perf_counter() - start


def converting(model: nn.Module, x: torch.Tensor, placement: str) -> tuple[float, nn.Module]:
    start = time.perf_counter()
    result = bnmove.convert(model, placement, method="exact", example_inputs=(x,))
    return time.perf_counter() - start, result.model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="", help="substring of the model names to run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, 3, 224, 224)
    print(
        f"torch {torch.__version__}, {args.threads} threads, exact method, 1x3x224x224, "
        f"median of {args.rounds} interleaved rounds; floor = symbolic_trace + 2 forward passes"
    )
    print(
        f"{'model':<36} {'floor':>9} {'-> after':>9} {'after -> before':>16} {'trained after -> before':>24}"
    )
    worst = 0.0
    for name, build in models():
        if args.only and args.only not in name:
            continue
        model = build()
        _, after = converting(model, x, "after")  # warm-up, and the after-variant to convert back
        trained = _trained_like(copy.deepcopy(after))
        floor(model, x), converting(after, x, "before"), converting(trained, x, "before")
        base: list[float] = []
        there: list[float] = []
        back: list[float] = []
        for _ in range(args.rounds):
            base.append(floor(model, x))
            there.append(converting(model, x, "after")[0])
            back.append(converting(after, x, "before")[0])
        b = statistics.median(base)
        ratios = statistics.median(there) / b, statistics.median(back) / b
        worst = max(worst, *ratios)
        # rounds of their own, with their own floor, so the two directions' rounds stay as they were
        base_again: list[float] = []
        trained_back: list[float] = []
        for _ in range(args.rounds):
            base_again.append(floor(model, x))
            trained_back.append(converting(trained, x, "before")[0])
        trained_ratio = statistics.median(trained_back) / statistics.median(base_again)
        print(
            f"{name:<36} {b * 1e3:7.0f}ms {ratios[0]:8.2f}x {ratios[1]:15.2f}x {trained_ratio:23.2f}x",
            flush=True,
        )
    print(f"worst ratio {worst:.2f}x of the first two (target: each <= 1.5x, none above 2x)")


if __name__ == "__main__":
    main()

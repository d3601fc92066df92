"""Speed of inspect + convert against torch.fx tracing plus two forward passes.

Issue 2's target: ``find_pairs`` + ``convert`` of a 150-block CNN takes no more
than about 1.5x the time of ``symbolic_trace`` plus two forward passes (the
verification's own floor). Both sides are measured in the same run,
interleaved, and the median of several rounds is reported.

    python benchmarks/bench_convert.py [--blocks 150] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import fx, nn

import bnmove
from bnmove.analysis.inputs import infer_example_inputs


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
    model = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def baseline(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> float:
    start = time.perf_counter()
    fx.symbolic_trace(model)
    with torch.no_grad():
        model(*inputs)
        model(*inputs)
    return time.perf_counter() - start


def bnmove_run(model: nn.Module) -> float:
    start = time.perf_counter()
    bnmove.find_pairs(model)
    bnmove.convert(model, "after", method="exact")  # infers 1x3x224x224 and verifies
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = make_cnn(args.blocks)
    inputs = infer_example_inputs(model)
    baseline(model, inputs), bnmove_run(model)  # warm-up: allocator, lazy imports
    base, ours = [], []
    for _ in range(args.rounds):
        base.append(baseline(model, inputs))
        ours.append(bnmove_run(model))
    b, o = statistics.median(base), statistics.median(ours)
    print(
        f"model: {args.blocks} conv-BN-ReLU blocks, input {tuple(inputs[0].shape)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"symbolic_trace + 2 forward passes: {b * 1000:8.1f} ms")
    print(f"find_pairs + convert (exact):     {o * 1000:8.1f} ms")
    print(f"ratio: {o / b:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()

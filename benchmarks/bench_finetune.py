"""Does a converted model fine-tune as well as the original? Per conversion method, on digits.

The usual reason to convert a trained model is to fine-tune it with the other
placement. For each block style (post-activation ``conv -> BN -> f``, where the
exact move folds the BN into the conv, and pre-activation ``x + conv(f(BN(x)))``,
where it keeps the BN's affine as a ``ChannelAffine``), each activation and
seed, this trains a model on scikit-learn's 8x8 digits, moves every BN after its
activation with each method (``exact``, calibrated ``fit`` on 256 training
samples, ``swap``), then fine-tunes every variant and the original identically:
a fresh Adam, the same learning rate, the same batches in the same order. It
prints validation accuracy before fine-tuning (epoch 0) and after each epoch,
as the mean over seeds of each variant's accuracy minus the original's
(negative: the conversion or the placement costs accuracy), worst seed in
brackets: first with the BN running statistics fine-tuning left (exponential
averages, momentum 0.1), then with every model's statistics recomputed exactly on
the training set (``bnmove.recalibrate``), which separates what the weights learnt
from the lag of the running averages.

    python benchmarks/bench_finetune.py [--seeds 3] [--epochs 3] [--lrs 3e-4,3e-3]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import bnmove
from bnmove.fitting.calibrate import recalibrate
from bnmove.sample_models import PreActResNet
from bnmove.study.data import load_dataset
from bnmove.study.loop import train_classifier, train_epoch

ACTS = {"ReLU": nn.ReLU, "GELU": nn.GELU, "Tanh": nn.Tanh}
#: conversion -> convert() arguments ("fit" is calibrated, on 256 training samples)
METHODS = {
    "exact": {"method": "exact"},
    "fit": {"method": "fit"},
    "fit-no-refit": {"method": "fit", "refit_next": False},  # with the calibration samples, below
    "swap": {"method": "swap"},
}


class PostActCNN(nn.Module):
    """``conv -> BN -> f`` three times, global pooling, a Linear: every BN folds into its conv."""

    def __init__(self, act: type[nn.Module], width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, width, 2 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), act()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build(style: str, act: type[nn.Module]) -> nn.Module:
    if style == "post-activation":
        return PostActCNN(act)
    return PreActResNet(10, width=32, blocks=3, in_channels=1, act=act, convs=1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def finetune(
    model: nn.Module, data: bnmove.study.Dataset, lr: float, epochs: int, seed: int
) -> tuple[list[float], list[float]]:
    """Accuracy before and after each epoch of fine-tuning (a fresh Adam, seeded batch order), with
    the running statistics as training left them and with statistics recomputed on the training set."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(1000 + seed)

    def recalibrated() -> float:
        return accuracy(recalibrate(model, data.train.x), data.val.x, data.val.y)

    curve, exact_stats = [accuracy(model, data.val.x, data.val.y)], [recalibrated()]
    for _ in range(epochs):
        perm = torch.randperm(len(data.train.y), generator=order)
        train_epoch(model, optimizer, data.train.x, data.train.y, perm, 64)
        curve.append(accuracy(model, data.val.x, data.val.y))
        exact_stats.append(recalibrated())
    return curve, exact_stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=12)
    parser.add_argument("--lrs", default="3e-4,3e-3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--styles", default="post-activation,pre-activation")
    parser.add_argument("--acts", default=",".join(ACTS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    lrs = [float(v) for v in args.lrs.split(",")]
    data = load_dataset("digits")
    calibration = data.train.x[:256]
    print(
        f"digits: train {args.train_epochs} epochs (Adam, cosine), move every BN after its activation, "
        f"fine-tune {args.epochs} epochs (fresh Adam, same batches); accuracy minus the original's, "
        f"epochs 0..{args.epochs}, mean over {args.seeds} seeds (worst seed)"
    )
    for style in args.styles.split(","):
        for act_name in args.acts.split(","):
            act = ACTS[act_name]
            started = time.perf_counter()
            for lr in lrs:
                rows: dict[str, list[list[float]]] = {m: [] for m in ("original", *methods)}
                recal: dict[str, list[list[float]]] = {m: [] for m in ("original", *methods)}
                for seed in range(args.seeds):
                    torch.manual_seed(seed)
                    trained = train_classifier(
                        build(style, act), data, epochs=args.train_epochs, cosine=True, seed=seed
                    )
                    variants = {"original": copy.deepcopy(trained)}
                    for method in methods:
                        kwargs: dict[str, Any] = dict(METHODS[method])
                        refit = kwargs.pop("refit_next", True)
                        if kwargs["method"] == "fit":
                            kwargs["calibration"] = bnmove.Calibration(calibration, refit_next=refit)
                        example = (data.val.x[:4],)
                        variants[method] = bnmove.convert(
                            trained, "after", example_inputs=example, **kwargs
                        ).model
                    for name, model in variants.items():
                        torch.manual_seed(seed)
                        curve, exact_stats = finetune(model, data, lr, args.epochs, seed)
                        rows[name].append(curve)
                        recal[name].append(exact_stats)
                print(f"\n{style}, {act_name}, lr {lr:g}")
                for label, table in (("running statistics", rows), ("statistics recomputed", recal)):
                    base = table["original"]
                    mean_base = [sum(r[e] for r in base) / len(base) for e in range(args.epochs + 1)]
                    print(f"  {label}: original " + " ".join(f"{v:6.1%}" for v in mean_base))
                    for method in methods:
                        cells = []
                        for e in range(args.epochs + 1):
                            diffs = [r[e] - b[e] for r, b in zip(table[method], base, strict=True)]
                            cells.append(f"{sum(diffs) / len(diffs):+6.1%} ({min(diffs):+.1%})")
                        print(f"    {method:<12} " + "  ".join(cells))
            print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

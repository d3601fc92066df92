"""A plain PyTorch training script that knows nothing of bnmove.

It trains the model in --model on scikit-learn's 8x8 digits with --seed, evaluates it on a
fixed held-out split, and writes its metrics to --out/metrics.json. ``bnmove experiment --run``
runs it once per BatchNorm placement and seed, and compares the placements:

    bnmove experiment net.pt --allow-pickle \
        --run "python train.py --model {model} --seed {seed} --out {out}" --metric val_acc
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as 1x8x8 images scaled to [0, 1]; the last 360 images held out."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    labels = torch.tensor(y)
    return images[:-360], labels[:-360], images[-360:], labels[-360:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a whole pickled module (torch.save(model))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--print-json", action="store_true", help="print the metrics instead of writing them")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = torch.load(args.model, weights_only=False).to(args.device)
    x, y, x_val, y_val = digits()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x), generator=order).split(64):
            loss = F.cross_entropy(model(x[batch].to(args.device)), y[batch].to(args.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(x_val.to(args.device)).cpu()
    metrics = {
        "val_acc": float((scores.argmax(1) == y_val).float().mean()),
        "val_loss": float(F.cross_entropy(scores, y_val)),
    }
    if args.print_json:
        print(json.dumps(metrics))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()

"""Write the sample models as files bnmove reads: ``python -m samples.make_models -o DIR``.

For each sample, ``<name>.pt`` is the whole pickled module (load it with
``--allow-pickle``) and ``<name>.state.pt`` the state dict (load it with
``--arch samples.models:<name>``). BatchNorm statistics are warmed up on random
data so they are not the trivial mean 0 / variance 1 of a fresh model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bnmove.sample_models import SAMPLES


def build_sample(name: str, seed: int = 0) -> torch.nn.Module:
    factory, shape = SAMPLES[name]
    torch.manual_seed(seed)
    model = factory()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, *shape[1:]) * 1.5 + 0.3)
    return model.eval()


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-o", "--out", type=Path, default=Path("sample-models"), help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLES:
        model = build_sample(name)
        for path, obj in (
            (args.out / f"{name}.pt", model),
            (args.out / f"{name}.state.pt", model.state_dict()),
        ):
            torch.save(obj, path)
            written.append(path)
    print(f"wrote {len(written)} files to {args.out}/: " + ", ".join(p.name for p in written))
    return written


if __name__ == "__main__":
    main()

"""How inspect and convert scale with graph size, for two structures.

``sequential``: 50, 200 and 800 conv -> BN -> ReLU blocks in one ``nn.Sequential``.
``dense``: a DenseNet-like model of 12, 48 and 192 layers held in attributes, each reading the
concatenation of every earlier output (its BNs outside any Sequential, so moving them replaces
module slots: a walk of the whole model per replaced module would show here as quadratic growth).
Small inputs and widths, so graph work (tracing, detection, rewriting) dominates rather than
convolutions. Prints time per block, the ratio to torch.fx ``symbolic_trace`` alone at the same
size (measured side by side), and the growth from the smallest to the largest model: linear cost
means 16x the blocks take about 16x the time (target <= 18x).

    python benchmarks/bench_scaling.py [--structure sequential|dense|both] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import DenseNetLike, _trained_like, make_cnn

import bnmove


def median_time(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model: torch.nn.Module, x: tuple[torch.Tensor, ...], rounds: int) -> tuple[float, float, float]:
    """Median seconds of symbolic_trace, find_pairs and convert on one model."""
    trace = median_time(lambda: fx.symbolic_trace(model), rounds)
    inspect = median_time(lambda: bnmove.find_pairs(model), rounds)
    convert = median_time(lambda: bnmove.convert(model, "after", method="exact", example_inputs=x), rounds)
    return trace, inspect, convert


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--structure", choices=["sequential", "dense", "both"], default="both")
    parser.add_argument("--sizes", default="", help="comma-separated sizes (default: 50,200,800 / 12,48,192)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    structures = ["sequential", "dense"] if args.structure == "both" else [args.structure]
    for structure in structures:
        default = "50,200,800" if structure == "sequential" else "12,48,192"
        sizes = [int(s) for s in (args.sizes or default).split(",")]
        scale(structure, sizes, args.rounds)


def scale(structure: str, sizes: list[int], rounds: int) -> None:
    x = (torch.randn(1, 3, 16, 16),)
    rows = []
    print(
        f"{structure}: {'blocks':>6} {'trace ms':>9} {'inspect ms':>10} {'convert ms':>10} {'inspect/block':>13} "
        f"{'convert/block':>13} {'inspect/trace':>13} {'convert/trace':>13}"
    )
    for n in sizes:
        model = (
            make_cnn(n, width=8) if structure == "sequential" else _trained_like(DenseNetLike(n, growth=2))
        )
        trace, inspect, convert = measure(model, x, rounds)
        rows.append((n, trace, inspect, convert))
        print(
            f"{'':>{len(structure) + 1}} {n:>6} {trace * 1e3:9.1f} {inspect * 1e3:10.1f} {convert * 1e3:10.1f} "
            f"{inspect / n * 1e6:11.0f}µs {convert / n * 1e6:11.0f}µs {inspect / trace:12.2f}x {convert / trace:12.2f}x"
        )
    (n0, t0, i0, c0), (n1, t1, i1, c1) = rows[0], rows[-1]
    print(
        f"{structure} growth {n0} -> {n1} blocks ({n1 / n0:.0f}x more): inspect {i1 / i0:.1f}x, convert {c1 / c0:.1f}x "
        f"(linear would be {n1 / n0:.0f}x; target <= {n1 / n0 * 18 / 16:.0f}x); symbolic_trace itself {t1 / t0:.1f}x "
        "(a dense model's graph grows faster than its layers: each concatenation reads every earlier output)"
    )


if __name__ == "__main__":
    main()

"""How inspect and convert scale with graph size: 50, 200 and 800 blocks.

Each block is conv -> BN -> ReLU on a small input, so graph work (tracing,
detection, rewriting, recompiling) dominates rather than convolutions. Prints
time per block, the ratio to torch.fx ``symbolic_trace`` alone at the same size
(measured side by side), and the growth from the smallest to the largest model:
linear cost means 800 blocks take about 16x the time of 50 (target <= 18x).

    python benchmarks/bench_scaling.py [--sizes 50,200,800] [--rounds 3]
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

from bench_convert import make_cnn

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
    parser.add_argument("--sizes", default="50,200,800")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    x = (torch.randn(1, 3, 16, 16),)
    rows = []
    print(
        f"{'blocks':>6} {'trace ms':>9} {'inspect ms':>10} {'convert ms':>10} {'inspect/block':>13} "
        f"{'convert/block':>13} {'inspect/trace':>13} {'convert/trace':>13}"
    )
    for n in sizes:
        model = make_cnn(n, width=8)
        trace, inspect, convert = measure(model, x, args.rounds)
        rows.append((n, trace, inspect, convert))
        print(
            f"{n:>6} {trace * 1e3:9.1f} {inspect * 1e3:10.1f} {convert * 1e3:10.1f} "
            f"{inspect / n * 1e6:11.0f}µs {convert / n * 1e6:11.0f}µs {inspect / trace:12.2f}x {convert / trace:12.2f}x"
        )
    (n0, _, i0, c0), (n1, _, i1, c1) = rows[0], rows[-1]
    print(
        f"growth {n0} -> {n1} blocks ({n1 / n0:.0f}x more): inspect {i1 / i0:.1f}x, convert {c1 / c0:.1f}x "
        f"(linear would be {n1 / n0:.0f}x; target <= {n1 / n0 * 18 / 16:.0f}x)"
    )


if __name__ == "__main__":
    main()

"""What ``bnmove experiment`` costs over training by hand: study throughput against a plain loop.

Trains the same model on the same data (digits, or random images of a chosen size) with
``bnmove.study.experiment.experiment`` (both placements, seeds, evaluation after every epoch,
digests, records) and with a plain PyTorch loop written here (Adam, the same batches, the same
evaluation), interleaved, and prints training images per second of each and the tool's overhead:
one run at a time (all cores), and with ``--jobs 2`` (two worker processes, the cores shared)
against the plain loop run the same way, two processes of one run each, process start included.

    python benchmarks/bench_experiment.py [--epochs 3] [--seeds 2] [--size 32] [--rounds 3] [--jobs 2]

With ``--busy``: a one-epoch digits study (one seed, both placements) on idle cores and beside one
CPU-bound process per core, with the thread count bnmove's loop chooses and with every core
(torch's default), interleaved; prints each one's slowdown (a fair share of the cores would be 2x on
2 cores; inherited threads read 7.9x on 2026-12-05).

With ``--run-overhead EPOCHS``: what ``bnmove experiment --run`` adds per run around the user's
own script (``examples/01_your_own_training/train.py``, EPOCHS epochs on digits: 60 take about a
minute on 2 cores), against running that script directly on the same variant files, interleaved.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

import bnmove
from bnmove.core.threads import available_cores
from bnmove.sample_models import PreActResNet
from bnmove.study import Execution, Training
from bnmove.study.data import Dataset, Split, load_dataset
from bnmove.study.experiment import experiment


def plain_loop(model: torch.nn.Module, data: Dataset, epochs: int, batch_size: int, seed: int) -> None:
    """What a user would write: Adam, shuffled mini-batches, evaluation after each epoch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(data.train.y), generator=order)
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for start in range(0, len(data.val.y), 256):
                F.cross_entropy(model(data.val.x[start : start + 256]), data.val.y[start : start + 256])


def build(channels: int) -> torch.nn.Module:
    return PreActResNet(10, width=32, blocks=3, in_channels=channels)


def plain_run(data: Dataset, channels: int, placement: str, seed: int, epochs: int, batch_size: int) -> None:
    """One (placement, seed) run by hand: seeded model, converted with swap, the plain loop."""
    torch.manual_seed(seed)
    model = bnmove.convert(
        build(channels), placement, method="swap", example_inputs=(data.train.x[:2],)
    ).model
    plain_loop(model, data, epochs, batch_size, seed)


def _one_thread_each(threads: int) -> None:
    torch.set_num_threads(threads)


def plain_in_processes(data: Dataset, channels: int, args: argparse.Namespace) -> None:
    """The plain loop spread as the tool spreads --jobs: spawned processes, the cores shared out."""
    threads = max(1, available_cores() // args.jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=_one_thread_each, initargs=(threads,)
    ) as pool:
        runs = [
            pool.submit(plain_run, data, channels, placement, seed, args.epochs, args.batch_size)
            for seed in range(args.seeds)
            for placement in ("before", "after")
        ]
        for run in runs:
            run.result()


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "01_your_own_training"


def run_overhead(epochs: int, rounds: int) -> None:
    """``bnmove experiment --run`` (both placements, one seed) against the same script run directly
    on the variant files the study wrote, interleaved. bnmove's own time is the study's wall time
    less the time its runs took (``wall_seconds``: writing the variant, the command, reading its
    metrics), measured in the same process tree; the direct runs show how much the script's own
    time varies from one run to the next on this machine."""
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE)}
    script = [sys.executable, str(EXAMPLE / "train.py")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, str(EXAMPLE / "net.py")], cwd=work, check=True)
        command = f"{sys.executable} {EXAMPLE / 'train.py'} --model {{model}} --seed {{seed}} --out {{out}} --epochs {epochs}"
        study = [sys.executable, "-m", "bnmove", "experiment", "net.pt", "--allow-pickle", "--import", "net",
                 "--run", command, "--metric", "val_acc", "--seeds", "1", "--force", "-o", "study"]  # fmt: skip
        total, inside, direct = [], [], []
        for _ in range(rounds):  # interleaved, so both see the same machine load
            started = time.perf_counter()
            subprocess.run(study, cwd=work, env=env, check=True, capture_output=True)
            total.append(time.perf_counter() - started)
            inside.append(
                sum(json.loads((work / "study" / "results.json").read_text())["wall_seconds"].values())
            )
            for variant in ("before", "after"):  # the files bnmove wrote, run as the user would
                model = work / f"{variant}.pt"
                shutil.copy(work / "study" / "jobs" / f"{variant}-seed0" / "model.pt", model)
                started = time.perf_counter()
                subprocess.run([*script, "--model", str(model), "--seed", "0", "--out", str(work / "direct"),
                                "--epochs", str(epochs)], cwd=work, env=env, check=True)  # fmt: skip
                direct.append(time.perf_counter() - started)
    own = [(t - i) / 2 for t, i in zip(total, inside, strict=True)]
    run = statistics.median(inside) / 2
    print(
        f"--run around examples/01_your_own_training/train.py, {epochs} epochs on digits, {rounds} rounds of 2 runs"
    )
    print(f"  script run directly:      {statistics.median(direct):6.1f} s per run "
          f"(min {min(direct):.1f}, max {max(direct):.1f}: this machine's run-to-run noise)")  # fmt: skip
    print(
        f"  the same runs in the study: {run:6.1f} s per run (writing the variant, the command, its metrics)"
    )
    print(f"  bnmove's own time (start-up, conversion, report): {statistics.median(own):.1f} s per run, "
          f"{statistics.median(own) / run:+.1%} of a run")  # fmt: skip
    print(
        f"  whole study against direct runs: {statistics.median(total) / 2:.1f} against "
        f"{statistics.median(direct):.1f} s per run, {statistics.median(total) / 2 / statistics.median(direct) - 1:+.1%}"
    )


def _hogs(count: int) -> list[subprocess.Popen[bytes]]:
    """One CPU-bound process per core: a busy machine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def busy(rounds: int) -> None:
    """A one-epoch digits study, idle and beside one CPU-bound process per core, at the thread
    count bnmove chooses and at every core."""
    data = load_dataset("digits")
    cores = available_cores()

    def study(threads: int | None) -> float:
        started = time.perf_counter()
        experiment(
            bnmove.sample_models.digits_net(),
            data,
            seeds=1,
            training=Training(epochs=1, threads=threads),
            execution=Execution(device="cpu"),
        )
        return time.perf_counter() - started

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for load in ("idle", "busy"):
            hogs = _hogs(cores) if load == "busy" else []
            try:
                for policy, threads in (("chosen", None), (f"{cores} threads", cores)):
                    times.setdefault((load, policy), []).append(study(threads))
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    print(f"one-epoch digits study (1 seed, both placements), {cores} cores, median of {rounds} rounds")
    for policy in ("chosen", f"{cores} threads"):
        idle, loaded = (statistics.median(times[(load, policy)]) for load in ("idle", "busy"))
        print(
            f"  {policy:<12} idle {idle:6.2f} s   beside {cores} CPU-bound processes {loaded:6.2f} s   "
            f"slowdown {loaded / idle:5.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--size", type=int, default=0, help="random 3-channel images of this size (0: digits)"
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for the parallel comparison")
    parser.add_argument("--busy", action="store_true", help="the study idle and beside one CPU hog per core")
    parser.add_argument(
        "--run-overhead", type=int, metavar="EPOCHS", help="measure --run's overhead instead (see above)"
    )
    args = parser.parse_args()
    if args.busy:
        busy(args.rounds)
        return
    if args.run_overhead:
        run_overhead(args.run_overhead, args.rounds)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.size:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.samples, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.samples,), generator=g)
        cut = args.samples * 4 // 5
        data = Dataset(Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:]), f"random {args.size}px")
        channels = 3
    else:
        data = load_dataset("digits")
        channels = 1
    assert isinstance(data.train, Split) and isinstance(data.val, Split)

    images = len(data.train.y) * args.epochs * args.seeds * 2  # two placements
    tool, plain, tool_jobs, plain_jobs, per_job = [], [], [], [], []
    for _ in range(args.rounds):  # interleaved, so both see the same machine load
        started = time.perf_counter()
        experiment(
            build(channels),
            data,
            placements=("before", "after"),
            seeds=args.seeds,
            training=Training(epochs=args.epochs),
        )
        tool.append(images / (time.perf_counter() - started))
        started = time.perf_counter()
        for seed in range(args.seeds):
            for placement in ("before", "after"):
                plain_run(data, channels, placement, seed, args.epochs, args.batch_size)
        plain.append(images / (time.perf_counter() - started))
        started = time.perf_counter()
        result = experiment(
            build(channels),
            data,
            placements=("before", "after"),
            seeds=args.seeds,
            training=Training(epochs=args.epochs),
            execution=Execution(jobs=args.jobs, devices=["cpu"]),
        )
        tool_jobs.append(images / (time.perf_counter() - started))
        runs = len(result.start_digests)
        per_job.append(images / runs / (sum(result.wall_seconds.values()) / runs))
        started = time.perf_counter()
        plain_in_processes(data, channels, args)
        plain_jobs.append(images / (time.perf_counter() - started))
    t, p = statistics.median(tool), statistics.median(plain)
    tj, pj = statistics.median(tool_jobs), statistics.median(plain_jobs)
    print(
        f"{data.name}: {len(data.train.y)} training images, {args.epochs} epochs x {args.seeds} seeds x 2 placements, "
        f"median of {args.rounds} interleaved rounds, {available_cores()} cores"
    )
    print("one run at a time, all cores:")
    print(f"  bnmove experiment:  {t:8.0f} training images/s")
    print(f"  plain PyTorch loop: {p:8.0f} training images/s (conversion included, as in the tool)")
    print(f"  overhead of the tool: {(p / t - 1):+.1%}")
    print(f"--jobs {args.jobs}, spawned worker processes sharing the cores (start-up included):")
    print(
        f"  bnmove experiment:  {tj:8.0f} training images/s in all, {statistics.median(per_job):.0f} per job"
    )
    print(f"  plain PyTorch loop: {pj:8.0f} training images/s in all ({args.jobs} processes, the same runs)")
    print(f"  overhead of the tool: {(pj / tj - 1):+.1%}")


if __name__ == "__main__":
    main()

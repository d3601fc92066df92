"""A placement study around the user's own training: a Python callable or any command.

bnmove builds each variant (same initialisation per seed), hands it to the user's training and
keeps what comes back; pairing, resuming and verdicts are the study's, as for bnmove's own loop.

- A callable ``train(model, seed, device) -> {"val_accuracy": 0.93, ...}`` gets the variant on
  ``device``, trains and evaluates it, and returns its metrics.
- A command (``--run``) is a shell command line with placeholders: ``{model}`` (the variant,
  saved as a whole module: ``torch.load(path, weights_only=False)``), ``{seed}``, ``{out}`` (the
  run's own folder), ``{device}`` and ``{variant}``. It reports its metrics in
  ``{out}/metrics.json``, or as the last line of its standard output that is a JSON object.
  Its output is kept in ``{out}/stdout.log`` and ``{out}/stderr.log``. With ``--devices``, a
  run on ``cuda:N`` sees only that GPU (``CUDA_VISIBLE_DEVICES`` names it, through the parent's
  own ``CUDA_VISIBLE_DEVICES`` when it has one) and gets ``{device}=cuda``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import string
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BnmoveError
from . import runner
from .devices import on_device, physical_gpu
from .jobs import Job
from .runs import Finished, Run, RunFinished, RunStarted, start_model, weights_digest

#: what a ``--run`` command line may name
PLACEHOLDERS = ("model", "seed", "out", "device", "variant")

Trainer = Callable[[nn.Module, int, str], Mapping[str, Any]]


@dataclass(frozen=True)
class Command:
    """A ``--run`` command line with placeholders, checked when it is made."""

    template: str

    def __post_init__(self) -> None:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None]
        except ValueError as exc:
            raise BnmoveError(
                f"--run {self.template!r}: {exc} (write a literal brace as {{{{ or }}}})"
            ) from exc
        unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
        if unknown:
            raise BnmoveError(
                f"--run: unknown placeholder {{{unknown[0]}}}; use "
                + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
            )
        if "model" not in fields:
            raise BnmoveError("--run: the command must take the variant's model file: put {model} in it")

    def line(self, values: Mapping[str, str]) -> str:
        """The command line with every placeholder replaced by its shell-quoted value."""
        return self.template.format_map({k: shlex.quote(v) for k, v in values.items()})


@dataclass(frozen=True)
class UserPlan:
    """What every run of a study with the user's training shares (sent once to each worker)."""

    model: nn.Module
    example: tuple[torch.Tensor, ...]
    from_pretrained: bool
    train: Trainer | Command
    #: where each command run gets its folder (``{out}``); None for a callable
    runs_dir: Path | None
    keep_model: bool
    settings: dict[str, Any]
    fingerprint: str


def user_run(plan: UserPlan, run: Run, device: str, report: Callable[[Any], None]) -> Finished:
    """One (placement, seed) run trained by the user's callable or command."""
    report(RunStarted(run.variant, run.seed, device))
    net = start_model(plan.model, run, plan.from_pretrained, plan.example)
    digest = weights_digest(net)
    started = time.perf_counter()
    if isinstance(plan.train, Command):
        assert plan.runs_dir is not None
        metrics = _run_command(plan.train, net, run, device, plan.runs_dir)
    else:
        target = torch.device(device)
        net = net.to(target)
        with on_device(target):
            returned = plan.train(net, run.seed, device)
        metrics = numeric_metrics(returned, f"run {run.key}: train returned")
    seconds = time.perf_counter() - started
    report(RunFinished(run.variant, run.seed, metrics))
    job = Job(plan.fingerprint, [], seconds, digest, "", metrics, plan.settings)
    return Finished(run, job, net.cpu() if plan.keep_model else None)


def numeric_metrics(value: Any, what: str) -> dict[str, float]:
    """The finite numbers of a metrics mapping, by name; an error for anything that is not a mapping."""
    if not isinstance(value, Mapping):
        raise BnmoveError(
            f"{what} {type(value).__name__}, not a dict of metrics like {{'val_accuracy': 0.93}}"
        )
    out = {}
    for name, number in value.items():
        if isinstance(number, torch.Tensor) and number.numel() == 1:
            number = number.item()
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            out[str(name)] = float(number)
    return out


def run_folder(runs_dir: Path, run: Run) -> Path:
    return runs_dir / f"{run.variant}-seed{run.seed}"


def _run_command(command: Command, net: nn.Module, run: Run, device: str, runs_dir: Path) -> dict[str, float]:
    out = run_folder(runs_dir, run)
    if out.exists():  # what an interrupted attempt left
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model_file = out / "model.pt"
    torch.save(net, model_file)
    env = dict(os.environ)
    # the model's module resolves in the script as it did here (bnmove imports from the working folder)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    name = device
    if device.startswith("cuda:"):  # the run sees its GPU only, as cuda
        index = int(device.partition(":")[2])
        env["CUDA_VISIBLE_DEVICES"], name = (
            physical_gpu(index, os.environ.get("CUDA_VISIBLE_DEVICES")),
            "cuda",
        )
    threads = runner.thread_share()
    if threads is not None and not device.startswith("cuda"):
        env.setdefault("OMP_NUM_THREADS", str(threads))
    line = command.line(
        {
            "model": str(model_file),
            "seed": str(run.seed),
            "out": str(out),
            "device": name,
            "variant": run.variant,
        }
    )
    (out / "command.txt").write_text(line + "\n")
    with (out / "stdout.log").open("wb") as stdout, (out / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            line, shell=True, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # its own process group: stopped with all its children
        )  # fmt: skip
        with runner.child(process):
            code = process.wait()
    if code != 0:
        raise BnmoveError(
            f"run {run.key} failed (exit {code}): {_tail(out / 'stderr.log')}; its output is in {out}"
        )
    return read_metrics(out, run)


def _tail(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing on stderr)"


def read_metrics(out: Path, run: Run) -> dict[str, float]:
    """The run's metrics: ``out/metrics.json``, else the last JSON-object line of its stdout."""
    written = out / "metrics.json"
    if written.exists():
        try:
            return numeric_metrics(json.loads(written.read_text()), f"run {run.key}: {written} holds")
        except json.JSONDecodeError as exc:
            raise BnmoveError(f"run {run.key}: {written} is not JSON ({exc})") from exc
    for line in reversed((out / "stdout.log").read_text(errors="replace").splitlines()):
        if line.strip().startswith("{"):
            try:
                return numeric_metrics(json.loads(line), f"run {run.key}: its last JSON line holds")
            except json.JSONDecodeError:
                continue
    raise BnmoveError(
        f"run {run.key} reported no metrics: write {written} or print a JSON line such as "
        '{"val_accuracy": 0.93}'
    )

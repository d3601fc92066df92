"""bnmove's own training loop for a placement study: every variant trained the same way.

Each variant of a seed sees the same batches in the same order with the same optimiser, the same
dropout stream and the same augmentation draws; it is evaluated after every epoch. Digests of the
starting weights and of the batch order are recorded, so anyone can check that the comparison
was fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fitting.calibrate import precise_statistics
from .data import Dataset, Split
from .devices import on_device
from .jobs import EpochRecord, Job
from .recipes import Recipe, augment_batch
from .runs import Finished, Run, RunFinished, RunStarted, class_scores, start_model, weights_digest


@dataclass(frozen=True)
class Precision:
    """How a run computes: mixed precision (autocast to ``dtype``; float16 with loss scaling) and
    the channels-last memory layout for 4-d inputs."""

    autocast: torch.dtype | None = None
    channels_last: bool = False
    #: deterministic kernels only, for bitwise re-runs on CUDA (`bnmove.study.devices.on_device`)
    deterministic: bool = False

    @staticmethod
    def choose(
        device: torch.device,
        sample: torch.Tensor,
        amp: bool | None,
        channels_last: bool | None,
        deterministic: bool = False,
    ) -> Precision:
        """Defaults: both on CUDA (bfloat16 where the GPU has it, else float16), neither elsewhere.
        Asked for on the CPU, mixed precision is bfloat16."""
        cuda = device.type == "cuda"
        dtype = None
        if amp if amp is not None else cuda:
            dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        layout = (channels_last if channels_last is not None else cuda) and sample.dim() == 4
        return Precision(dtype, layout, deterministic)

    def describe(self) -> str:
        kind = f"mixed {str(self.autocast).removeprefix('torch.')}" if self.autocast else "float32"
        return (
            kind
            + (", channels-last" if self.channels_last else "")
            + (", deterministic" if self.deterministic else "")
        )

    def context(self, device: torch.device) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


def _train_batches(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    recipe: Recipe | None = None,
    scheduler: Any = None,
    generator: torch.Generator | None = None,
    precision: Precision = Precision(),
    scaler: Any = None,
) -> float:
    """One epoch of training on ``(x, y)`` mini-batches; returns the mean loss."""
    model.train()
    total, count = 0.0, 0
    for inputs, target in batches:
        if recipe is not None and recipe.augment and generator is not None:
            inputs = augment_batch(inputs, generator)
        with precision.context(inputs.device):
            scores = class_scores(model(precision.inputs(inputs)))
            loss = (
                recipe.loss(scores.float(), target)
                if recipe is not None
                else F.cross_entropy(scores.float(), target)
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # float16: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(target)
        count += len(target)
    return total / max(count, 1)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    *,
    recipe: Recipe | None = None,
    scheduler: Any = None,
    generator: torch.Generator | None = None,
) -> float:
    """One epoch of training over ``x[order]`` in mini-batches; returns the mean loss.

    With a ``recipe``: its loss (label smoothing), its augmentation (drawn from ``generator``),
    and ``scheduler`` stepped after every batch.
    """
    batches = Split(x, y).batches(batch_size, x.device, train=True)
    return _train_batches(
        model, optimizer, batches(order), recipe=recipe, scheduler=scheduler, generator=generator
    )


def train_classifier(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    cosine: bool = False,
) -> nn.Module:
    """Train ``model`` in place with Adam (optionally a cosine schedule), seeded; returns it in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
    order = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    batches = data.train.batches(batch_size, device, train=True)
    for _ in range(epochs):
        _train_batches(model, optimizer, batches(torch.randperm(len(data.train), generator=order)))
        if schedule is not None:
            schedule.step()
    return model.eval()


def evaluate(
    model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], precision: Precision = Precision()
) -> tuple[float, float]:
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, target in batches:
            with precision.context(x.device):
                out = class_scores(model(precision.inputs(x))).float()
            loss += float(F.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
            count += len(target)
    return loss / max(count, 1), correct / max(count, 1)


@dataclass(frozen=True)
class LoopPlan:
    """What every run of a study in bnmove's loop shares (sent once to each worker process)."""

    model: nn.Module
    data: Dataset
    epochs: int
    batch_size: int
    recipe: Recipe
    from_pretrained: bool
    precision: Precision
    keep_model: bool
    #: training samples to recompute BN statistics on before each evaluation (0: running averages)
    precise_bn: int
    #: what the runs' numbers depend on, and its hash, kept with each finished run
    settings: dict[str, Any]
    fingerprint: str


def train_run(plan: LoopPlan, run: Run, device: str, report: Callable[[Any], None]) -> Finished:
    """One (placement, seed) run: the seed's start, converted; trained; evaluated after each epoch."""
    target = torch.device(device)
    with on_device(target, plan.precision.deterministic):
        return _train_run(plan, run, target, report)


def _train_run(plan: LoopPlan, run: Run, target: torch.device, report: Callable[[Any], None]) -> Finished:
    device = str(target)
    report(RunStarted(run.variant, run.seed, device))
    net = start_model(plan.model, run, plan.from_pretrained, (plan.data.sample(2),)).to(target)
    start_digest = weights_digest(net)
    if plan.precision.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    recipe, precision = plan.recipe, plan.precision
    optimizer = recipe.optimizer(net)
    steps_per_epoch = math.ceil(len(plan.data.train) / plan.batch_size)
    scheduler = recipe.scheduler(optimizer, plan.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(target.type) if precision.autocast == torch.float16 else None
    train = plan.data.train.batches(plan.batch_size, target, train=True)
    val = plan.data.val.batches(max(plan.batch_size, 256), target, train=False)
    train_in_order = plan.data.train.batches(max(plan.batch_size, 256), target, train=False)
    val_order = torch.arange(len(plan.data.val))
    order = torch.Generator().manual_seed(run.seed)
    seen = hashlib.sha256()
    records = []
    for epoch in range(1, plan.epochs + 1):
        started = time.perf_counter()
        torch.manual_seed(run.seed * 1_000_003 + epoch)  # same dropout stream for every variant
        perm = torch.randperm(len(plan.data.train), generator=order)
        seen.update(perm.numpy().tobytes())
        crops = torch.Generator().manual_seed(run.seed * 1_000_003 + epoch)  # same augmentation per variant
        train_loss = _train_batches(
            net,
            optimizer,
            train(perm),
            recipe=recipe,
            scheduler=scheduler,
            generator=crops,
            precision=precision,
            scaler=scaler,
        )
        if plan.precise_bn:  # exact statistics of the first samples, not the lagging running averages
            subset = torch.arange(min(plan.precise_bn, len(plan.data.train)))
            with precision.context(target):
                precise_statistics(
                    net, (x for x, _ in train_in_order(subset)), lambda x: net(precision.inputs(x))
                )
        val_loss, val_acc = evaluate(net, val(val_order), precision)
        seconds = time.perf_counter() - started
        record = EpochRecord(run.variant, run.seed, epoch, train_loss, val_loss, val_acc, seconds)
        records.append(record)
        report(record)
    last = records[-1]
    metrics = {
        "val_accuracy": last.val_accuracy,
        "val_loss": last.val_loss,
        "train_loss": last.train_loss,
        "best_val_accuracy": max(r.val_accuracy for r in records),
    }
    report(RunFinished(run.variant, run.seed, metrics))
    seconds = sum(r.seconds for r in records)
    job = Job(plan.fingerprint, records, seconds, start_digest, seen.hexdigest(), metrics, plan.settings)
    if plan.keep_model:
        net = net.to(memory_format=torch.contiguous_format).cpu()  # type: ignore[call-overload]
    return Finished(run, job, net if plan.keep_model else None)

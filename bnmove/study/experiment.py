"""Answer "before or after?" on the user's own model and data: train every placement the same way.

For each seed, every variant starts from the same point: by default one random
initialisation, converted with ``swap`` (which keeps every parameter, so the
variants differ only in where BN sits); with ``from_pretrained`` the trained
weights, converted with ``auto`` (exact where possible) for fine-tuning. Each
variant then sees the same batches in the same order with the same optimiser.
Digests of the starting weights and of the batch order are recorded, so anyone
can check that the comparison was fair.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import atomic_path
from .._clone import clone_module
from ..errors import BnmoveError, ModelRunError
from ..fitting.calibrate import precise_statistics
from ..moving.conversion import convert
from .data import Dataset, Split, from_torch
from .recipes import Recipe, augment_batch
from .runner import execute

VARIANTS = ("original", "before", "after")


@dataclass(frozen=True)
class EpochRecord:
    variant: str
    seed: int
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass(frozen=True)
class EpochSummary:
    """Mean and standard deviation over seeds for one variant at one epoch."""

    variant: str
    epoch: int
    train_loss: float
    train_loss_std: float
    val_loss: float
    val_loss_std: float
    val_accuracy: float
    val_accuracy_std: float


#: two-sided 95% quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df))
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (scipy's where installed;
    else the table, rounding ``df`` down, which errs toward wider intervals)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.975, df))
    except ImportError:
        return _T975[max(k for k in _T975 if k <= df)] if df < 1000 else 1.960


@dataclass(frozen=True)
class PairedDifference:
    """Final validation accuracy of ``b`` minus ``a``, paired by seed (same init, same batches)."""

    a: str
    b: str
    differences: list[float]
    mean: float
    #: 95% confidence interval of the mean (Student t over seeds); None with a single seed
    low: float | None
    high: float | None

    @property
    def seeds(self) -> int:
        return len(self.differences)

    def verdict(self) -> str:
        """One line: which placement is better and by how much, or that no difference is detectable."""
        points = 100 * self.mean
        if self.low is None or self.high is None:
            return (
                f"{self.b} vs {self.a}: {points:+.1f} points on one seed; "
                "no interval without more seeds (--seeds 3 or more)"
            )
        few = "; too few seeds for a reliable interval" if self.seeds < 3 else ""
        if self.low > 0 or self.high < 0:  # the interval excludes zero: name the better placement
            sign = 1 if self.mean > 0 else -1
            better, worse = (self.b, self.a) if sign > 0 else (self.a, self.b)
            low, high = sorted((_points(sign * self.low), _points(sign * self.high)))
            return (
                f"{better} is better than {worse} by {abs(points):.1f} points "
                f"(95% CI {low:.1f} to {high:.1f}, {self.seeds} seeds){few}"
            )
        return (
            f"no detectable difference between {self.a} and {self.b} ({self.b} − {self.a}: 95% CI "
            f"{_points(self.low):+.1f} to {_points(self.high):+.1f}, {self.seeds} seeds){few}"
        )


def _points(fraction: float) -> float:
    """Accuracy fraction -> points, rounded to 0.1 without a negative zero."""
    return round(100 * fraction, 1) + 0.0


def paired_difference(a: str, b: str, accuracies: dict[str, dict[int, float]]) -> PairedDifference:
    """``b - a`` per seed both ran, with its mean and 95% t interval."""
    seeds = sorted(set(accuracies[a]) & set(accuracies[b]))
    diffs = [accuracies[b][s] - accuracies[a][s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(a, b, diffs, mean, None, None)
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(a, b, diffs, mean, mean - half, mean + half)


@dataclass
class ExperimentResult:
    placements: list[str]
    seeds: list[int]
    epochs: int
    dataset: str
    device: str
    from_pretrained: bool
    recipe: Recipe
    records: list[EpochRecord]
    wall_seconds: dict[str, float]
    #: sha256 of each (variant, seed)'s starting parameters, in a placement-independent order
    start_digests: dict[str, str]
    #: sha256 of the batch order each (variant, seed) saw
    batch_digests: dict[str, str]
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    #: how the runs computed (``float32``, ``mixed bfloat16, channels-last``...)
    precision: str = "float32"
    #: training samples BN statistics were recomputed on before each evaluation (0: running averages)
    precise_bn: int = 0

    def summary(self) -> list[EpochSummary]:
        out = []
        for variant in self.placements:
            for epoch in range(1, self.epochs + 1):
                rows = [r for r in self.records if r.variant == variant and r.epoch == epoch]
                out.append(
                    EpochSummary(
                        variant,
                        epoch,
                        *_mean_std([r.train_loss for r in rows]),
                        *_mean_std([r.val_loss for r in rows]),
                        *_mean_std([r.val_accuracy for r in rows]),
                    )
                )
        return out

    def final(self, variant: str) -> EpochSummary:
        return next(s for s in self.summary() if s.variant == variant and s.epoch == self.epochs)

    def best(self, variant: str) -> tuple[float, float]:
        """Mean and std over seeds of each run's best validation accuracy over its epochs."""
        best: dict[int, float] = {}
        for r in self.records:
            if r.variant == variant:
                best[r.seed] = max(best.get(r.seed, 0.0), r.val_accuracy)
        return _mean_std(list(best.values()))

    def differences(self, epoch: int | None = None) -> list[PairedDifference]:
        """Each later placement against each earlier one, on validation accuracy at ``epoch``
        (default the last), paired by seed."""
        at = epoch or self.epochs
        final = {
            v: {r.seed: r.val_accuracy for r in self.records if r.variant == v and r.epoch == at}
            for v in self.placements
        }
        return [
            paired_difference(a, b, final)
            for i, a in enumerate(self.placements)
            for b in self.placements[i + 1 :]
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "placements": self.placements,
            "seeds": self.seeds,
            "epochs": self.epochs,
            "dataset": self.dataset,
            "device": self.device,
            "from_pretrained": self.from_pretrained,
            "precision": self.precision,
            "precise_bn": self.precise_bn,
            "recipe": self.recipe.to_dict(),
            "wall_seconds": self.wall_seconds,
            "start_digests": self.start_digests,
            "batch_digests": self.batch_digests,
            "summary": [asdict(s) for s in self.summary()],
            "best_val_accuracy": {
                v: dict(zip(("mean", "std"), self.best(v), strict=True)) for v in self.placements
            },
            "differences": [{**asdict(d), "verdict": d.verdict()} for d in self.differences()],
            "records": [asdict(r) for r in self.records],
        }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _key(variant: str, seed: int) -> str:
    return f"{variant}/seed{seed}"


def weights_digest(model: nn.Module) -> str:
    """Digest of the parameter and buffer *values*, sorted, so it ignores names and graph order."""
    blobs = sorted(t.detach().cpu().contiguous().numpy().tobytes() for t in model.state_dict().values())
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(blob)
    return digest.hexdigest()


def reinitialize(model: nn.Module, seed: int) -> None:
    """Fresh random weights (and BN statistics) from ``seed``, layer by layer, in module order."""
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def class_scores(output: Any) -> Any:
    """The class scores in a model's output: the tensor itself, ``logits`` of an HF ``ModelOutput``
    (or any mapping/object with that field), or the first element of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def check_data(model: nn.Module, data: Dataset) -> int:
    """Fail before any training when data and model do not fit; returns the number of classes."""
    probe = clone_module(model).eval()
    x = data.sample(2)
    try:
        with torch.no_grad():
            out = class_scores(probe(x.to(next(probe.parameters()).device)))
    except Exception as exc:
        raise ModelRunError(
            f"the model does not accept samples of shape {tuple(x.shape[1:])} from {data.name}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BnmoveError(f"the model must return class scores (batch x classes), it returns {shape}")
    classes = int(out.shape[1])
    if data.num_classes is not None and data.num_classes > classes:
        raise BnmoveError(
            f"labels go up to {data.num_classes - 1} but the model scores only {classes} classes"
        )
    return classes


@dataclass(frozen=True)
class Precision:
    """How a run computes: mixed precision (autocast to ``dtype``; float16 with loss scaling) and
    the channels-last memory layout for 4-d inputs."""

    autocast: torch.dtype | None = None
    channels_last: bool = False

    @staticmethod
    def choose(
        device: torch.device, sample: torch.Tensor, amp: bool | None, channels_last: bool | None
    ) -> Precision:
        """Defaults: both on CUDA (bfloat16 where the GPU has it, else float16), neither elsewhere.
        Asked for on the CPU, mixed precision is bfloat16."""
        cuda = device.type == "cuda"
        dtype = None
        if amp if amp is not None else cuda:
            dtype = torch.bfloat16 if not cuda or torch.cuda.is_bf16_supported() else torch.float16
        layout = (channels_last if channels_last is not None else cuda) and sample.dim() == 4
        return Precision(dtype, layout)

    def describe(self) -> str:
        kind = f"mixed {str(self.autocast).removeprefix('torch.')}" if self.autocast else "float32"
        return kind + (", channels-last" if self.channels_last else "")

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


def _evaluate(
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


@dataclass
class Job:
    """One finished (placement, seed) run, as kept in a study's jobs folder."""

    fingerprint: str
    records: list[EpochRecord]
    seconds: float
    start_digest: str
    batch_digest: str


def study_fingerprint(
    model: nn.Module,
    data: Dataset,
    placements: Sequence[str],
    epochs: int,
    batch_size: int,
    recipe: Recipe,
    from_pretrained: bool,
    precision: Precision = Precision(),
    precise_bn: int = 0,
) -> str:
    """What a run's numbers depend on besides its seed: settings, the model (its weights when
    training starts from them), the data (its values; for streamed data, what identifies the items)."""
    digest = hashlib.sha256()
    settings = {
        "placements": sorted(placements),
        "epochs": epochs,
        "batch_size": batch_size,
        "recipe": recipe.to_dict(),
        "from_pretrained": from_pretrained,
        "precision": precision.describe(),
        **({"precise_bn": precise_bn} if precise_bn else {}),  # absent when off: older studies resume
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    if from_pretrained:
        digest.update(weights_digest(model).encode())
    else:  # each seed re-initialises: the architecture matters, not these weights
        shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        digest.update(json.dumps([type(model).__qualname__, shapes]).encode())
    data.train.fingerprint(digest)
    data.val.fingerprint(digest)
    return digest.hexdigest()


def _job_path(folder: Path, variant: str, seed: int) -> Path:
    return folder / f"{variant}-seed{seed}.json"


def load_job(folder: Path, variant: str, seed: int, fingerprint: str) -> Job | None:
    """The finished run kept in ``folder``, None if there is none; an error if it was made differently."""
    path = _job_path(folder, variant, seed)
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        job = Job(
            raw["fingerprint"],
            [EpochRecord(**r) for r in raw["records"]],
            float(raw["seconds"]),
            raw["start_digest"],
            raw["batch_digest"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BnmoveError(f"{path}: not a run bnmove kept ({exc}); remove it or pass --force") from exc
    if job.fingerprint != fingerprint:
        raise BnmoveError(
            f"{path}: this run was made with other settings, model or data; resume with the same ones, "
            "or use another folder (--force starts over)"
        )
    return job


def save_job(folder: Path, variant: str, seed: int, job: Job) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(job), "records": [asdict(r) for r in job.records]}
    with atomic_path(_job_path(folder, variant, seed)) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


@dataclass(frozen=True)
class _Plan:
    """What every run of a study shares (sent once to each worker process)."""

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
    #: what the runs' numbers depend on (:func:`study_fingerprint`), kept with each finished run
    fingerprint: str


@dataclass(frozen=True)
class _Run:
    variant: str
    seed: int


@dataclass
class _Finished:
    run: _Run
    job: Job
    model: nn.Module | None


@dataclass(frozen=True)
class RunStarted:
    """Progress event: a run began on ``device``."""

    variant: str
    seed: int
    device: str


def _train_run(plan: _Plan, run: _Run, device: str, report: Callable[[Any], None]) -> _Finished:
    """One (placement, seed) run: the seed's start, converted; trained; evaluated after each epoch."""
    target = torch.device(device)
    report(RunStarted(run.variant, run.seed, device))
    base = clone_module(plan.model).cpu()
    if not plan.from_pretrained:
        reinitialize(base, run.seed)
    if run.variant == "original":
        net = base
    else:
        method = "auto" if plan.from_pretrained else "swap"
        net = convert(base, run.variant, method=method, example_inputs=(plan.data.sample(2),)).model
    net = net.to(target)
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
        val_loss, val_acc = _evaluate(net, val(val_order), precision)
        seconds = time.perf_counter() - started
        record = EpochRecord(run.variant, run.seed, epoch, train_loss, val_loss, val_acc, seconds)
        records.append(record)
        report(record)
    job = Job(plan.fingerprint, records, sum(r.seconds for r in records), start_digest, seen.hexdigest())
    if plan.keep_model:
        net = net.to(memory_format=torch.contiguous_format).cpu()  # type: ignore[call-overload]
    return _Finished(run, job, net if plan.keep_model else None)


def experiment(
    model: nn.Module,
    data: Dataset | torch.utils.data.Dataset[Any] | torch.utils.data.DataLoader[Any] | tuple[Any, ...],
    *,
    placements: Sequence[str] = ("before", "after"),
    epochs: int = 5,
    seeds: int | Sequence[int] = 3,
    batch_size: int = 64,
    lr: float = 1e-3,
    from_pretrained: bool = False,
    device: str | None = None,
    keep_models: bool = False,
    on_epoch: Callable[[str, int, int, EpochRecord], None] | None = None,
    recipe: Recipe | None = None,
    jobs_dir: Path | None = None,
    jobs: int | None = None,
    devices: Sequence[str] | None = None,
    backend: str = "local",
    amp: bool | None = None,
    channels_last: bool | None = None,
    on_start: Callable[[str, int, str], None] | None = None,
    precise_bn: int = 0,
) -> ExperimentResult:
    """Train each placement variant of ``model`` under identical conditions and record the curves.

    Args:
        model: the architecture (and, with ``from_pretrained``, the weights); not modified.
        data: a :class:`bnmove.study.data.Dataset` (``bnmove.study.data.load_dataset("digits")``, an ``.npz``,
            an image folder...), or a ``torch.utils.data.Dataset``/``DataLoader`` of ``(x, y)``, or a
            ``(train, val)`` pair of them (streamed in an order bnmove sets per seed).
        placements: variants to train: ``"before"``, ``"after"`` and/or ``"original"``.
        epochs: training epochs per variant and seed.
        seeds: a number of seeds (0..K-1) or the seeds themselves.
        batch_size, lr: mini-batch size, and Adam's learning rate when no ``recipe`` is given.
        from_pretrained: start from the model's weights (converted with ``auto``)
            instead of a fresh initialisation (converted with ``swap``).
        device: ``"cuda"`` when available unless given (or ``devices``).
        keep_models: keep the trained models in ``result.models`` (for inspection).
        on_epoch: progress callback ``(variant, seed, epoch, record)``.
        recipe: optimiser, schedule, weight decay, label smoothing, augmentation
            (:class:`bnmove.study.recipes.Recipe`); default Adam at ``lr``, nothing else.
        jobs_dir: keep each finished (placement, seed) run here, and take runs already there
            instead of training them again (an interrupted study resumes); runs made with other
            settings, model or data are refused.
        jobs: runs at once, in worker processes (default: one per device in ``devices``, else 1).
        devices: spread the runs over these devices (``["cuda:0", "cuda:1"]``), one run per
            device at a time unless ``jobs`` says more.
        backend: ``"local"`` (this machine) or ``"ray"`` (tasks on the Ray cluster ``ray.init()``
            connects to; ``RAY_ADDRESS`` names one).
        amp, channels_last: mixed precision and the channels-last layout; default on for CUDA.
        on_start: progress callback ``(variant, seed, device)`` when a run begins.
        precise_bn: before each evaluation, recompute every BN's statistics exactly on this many
            training samples ("precise BN") instead of using the running averages, which lag
            behind fast-moving weights, most of all right after a conversion; 0: off.

    Returns:
        An :class:`ExperimentResult` with per-epoch records, summaries over seeds and digests;
        runs are listed by seed and placement whatever order they finished in.
    """
    if not isinstance(data, Dataset):  # torch Datasets/DataLoaders: (train,) or (train, val)
        parts = data if isinstance(data, tuple) else (data,)
        data = from_torch(*parts)
    unknown = [p for p in placements if p not in VARIANTS]
    if unknown or not placements:
        raise BnmoveError(
            f"unknown placement {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}"
        )
    if epochs < 1 or batch_size < 1 or lr <= 0 or not math.isfinite(lr):
        raise BnmoveError("epochs and batch size must be at least 1 and the learning rate positive")
    if precise_bn < 0:
        raise BnmoveError("precise_bn is a number of training samples, 0 or more")
    recipe = recipe or Recipe("adam", lr=lr)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise BnmoveError("give at least one seed")
    targets = [
        torch.device(d) for d in (devices or [device or ("cuda" if torch.cuda.is_available() else "cpu")])
    ]
    for target in targets:
        if target.type == "cuda" and not torch.cuda.is_available():
            raise BnmoveError(f"device {target}: no CUDA GPU is visible to torch")
    precision = Precision.choose(targets[0], data.sample(2), amp, channels_last)
    check_data(model, data)

    fingerprint = study_fingerprint(
        model, data, placements, epochs, batch_size, recipe, from_pretrained, precision, precise_bn
    )
    finished: dict[_Run, Job] = {}
    models: dict[str, nn.Module] = {}
    for seed in seed_list:
        for variant in placements:
            done = load_job(jobs_dir, variant, seed, fingerprint) if jobs_dir is not None else None
            if done is not None:
                finished[_Run(variant, seed)] = done
    plan = _Plan(
        clone_module(model).cpu(),
        data,
        epochs,
        batch_size,
        recipe,
        from_pretrained,
        precision,
        keep_models,
        precise_bn,
        fingerprint,
    )
    pending = [_Run(v, s) for s in seed_list for v in placements if _Run(v, s) not in finished]

    def on_event(event: Any) -> None:
        if isinstance(event, RunStarted) and on_start is not None:
            on_start(event.variant, event.seed, event.device)
        elif isinstance(event, EpochRecord) and on_epoch is not None:
            on_epoch(event.variant, event.seed, event.epoch, event)

    for result in execute(
        _train_run,
        plan,
        pending,
        devices=[str(t) for t in targets],
        jobs=jobs or len(targets),
        backend=backend,
        on_event=on_event,
    ):
        if jobs_dir is not None:
            save_job(jobs_dir, result.run.variant, result.run.seed, result.job)
        finished[result.run] = result.job
        if result.model is not None:
            models[_key(result.run.variant, result.run.seed)] = result.model
    runs = [_Run(v, s) for s in seed_list for v in placements]
    wall = {v: sum(finished[r].seconds for r in runs if r.variant == v) for v in placements}
    return ExperimentResult(
        placements=list(placements),
        seeds=seed_list,
        epochs=epochs,
        dataset=data.name,
        device=", ".join(str(t) for t in targets),
        from_pretrained=from_pretrained,
        recipe=recipe,
        records=[r for run in runs for r in finished[run].records],
        wall_seconds=wall,
        start_digests={_key(r.variant, r.seed): finished[r].start_digest for r in runs},
        batch_digests={_key(r.variant, r.seed): finished[r].batch_digest for r in runs},
        models=models,
        precision=precision.describe(),
        precise_bn=precise_bn,
    )

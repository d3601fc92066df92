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

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._atomic import atomic_path
from .._clone import clone_module
from ..errors import BnmoveError, ModelRunError
from ..moving.conversion import convert
from .data import Dataset, from_torch
from .recipes import Recipe, augment_batch

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
    x = data.train.x[:2]
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
    if data.num_classes > classes:
        raise BnmoveError(
            f"labels go up to {data.num_classes - 1} but the model scores only {classes} classes"
        )
    return classes


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
    model.train()
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].to(x.device)
        if len(idx) < 2:
            continue  # BatchNorm cannot train on a single sample
        inputs = x[idx]
        if recipe is not None and recipe.augment and generator is not None:
            inputs = augment_batch(inputs, generator)
        scores = class_scores(model(inputs))
        loss = recipe.loss(scores, y[idx]) if recipe is not None else F.cross_entropy(scores, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)


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
    for _ in range(epochs):
        train_epoch(
            model,
            optimizer,
            data.train.x,
            data.train.y,
            torch.randperm(len(data.train.y), generator=order),
            batch_size,
        )
        if schedule is not None:
            schedule.step()
    return model.eval()


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            out = class_scores(model(x[start : start + batch_size]))
            target = y[start : start + batch_size]
            loss += float(F.cross_entropy(out, target, reduction="sum"))
            correct += int((out.argmax(1) == target).sum())
    return loss / len(y), correct / len(y)


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
) -> str:
    """What a run's numbers depend on besides its seed: settings, the model (its weights when
    training starts from them), the data."""
    digest = hashlib.sha256()
    settings = {
        "placements": sorted(placements),
        "epochs": epochs,
        "batch_size": batch_size,
        "recipe": recipe.to_dict(),
        "from_pretrained": from_pretrained,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    if from_pretrained:
        digest.update(weights_digest(model).encode())
    else:  # each seed re-initialises: the architecture matters, not these weights
        shapes = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        digest.update(json.dumps([type(model).__qualname__, shapes]).encode())
    for tensor in (data.train.x, data.train.y, data.val.x, data.val.y):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
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
) -> ExperimentResult:
    """Train each placement variant of ``model`` under identical conditions and record the curves.

    Args:
        model: the architecture (and, with ``from_pretrained``, the weights); not modified.
        data: a :class:`bnmove.study.data.Dataset` (``bnmove.study.data.load_dataset("digits")``, an ``.npz``...),
            or a ``torch.utils.data.Dataset``/``DataLoader`` of ``(x, y)``, or a ``(train, val)`` pair of them.
        placements: variants to train: ``"before"``, ``"after"`` and/or ``"original"``.
        epochs: training epochs per variant and seed.
        seeds: a number of seeds (0..K-1) or the seeds themselves.
        batch_size, lr: mini-batch size, and Adam's learning rate when no ``recipe`` is given.
        from_pretrained: start from the model's weights (converted with ``auto``)
            instead of a fresh initialisation (converted with ``swap``).
        device: ``"cuda"`` when available unless given.
        keep_models: keep the trained models in ``result.models`` (for inspection).
        on_epoch: progress callback ``(variant, seed, epoch, record)``.
        recipe: optimiser, schedule, weight decay, label smoothing, augmentation
            (:class:`bnmove.study.recipes.Recipe`); default Adam at ``lr``, nothing else.
        jobs_dir: keep each finished (placement, seed) run here, and take runs already there
            instead of training them again (an interrupted study resumes); runs made with other
            settings, model or data are refused.

    Returns:
        An :class:`ExperimentResult` with per-epoch records, summaries over seeds and digests.
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
    recipe = recipe or Recipe("adam", lr=lr)
    steps_per_epoch = math.ceil(len(data.train.y) / batch_size)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise BnmoveError("give at least one seed")
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_data(model, data)
    train_x, train_y = data.train.x.to(target), data.train.y.to(target)
    val_x, val_y = data.val.x.to(target), data.val.y.to(target)
    example = (data.train.x[:2],)

    fingerprint = study_fingerprint(model, data, placements, epochs, batch_size, recipe, from_pretrained)
    records: list[EpochRecord] = []
    wall = dict.fromkeys(placements, 0.0)
    start_digests: dict[str, str] = {}
    batch_digests: dict[str, str] = {}
    models: dict[str, nn.Module] = {}
    for seed in seed_list:
        base = clone_module(model).cpu()
        if not from_pretrained:
            reinitialize(base, seed)
        for variant in placements:
            done = load_job(jobs_dir, variant, seed, fingerprint) if jobs_dir is not None else None
            if done is not None:
                records.extend(done.records)
                wall[variant] += done.seconds
                start_digests[_key(variant, seed)] = done.start_digest
                batch_digests[_key(variant, seed)] = done.batch_digest
                continue
            job_records: list[EpochRecord] = []
            job_seconds = 0.0
            if variant == "original":
                net = clone_module(base)
            else:
                method = "auto" if from_pretrained else "swap"
                net = convert(base, variant, method=method, example_inputs=example).model
            net = net.to(target)
            start_digests[_key(variant, seed)] = weights_digest(net)
            optimizer = recipe.optimizer(net)
            scheduler = recipe.scheduler(optimizer, epochs * steps_per_epoch)
            order = torch.Generator().manual_seed(seed)
            seen = hashlib.sha256()
            for epoch in range(1, epochs + 1):
                started = time.perf_counter()
                torch.manual_seed(seed * 1_000_003 + epoch)  # same dropout stream for every variant
                perm = torch.randperm(len(train_y), generator=order)
                seen.update(perm.numpy().tobytes())
                crops = torch.Generator().manual_seed(
                    seed * 1_000_003 + epoch
                )  # same augmentation per variant
                train_loss = train_epoch(
                    net,
                    optimizer,
                    train_x,
                    train_y,
                    perm,
                    batch_size,
                    recipe=recipe,
                    scheduler=scheduler,
                    generator=crops,
                )
                val_loss, val_acc = _evaluate(net, val_x, val_y, max(batch_size, 256))
                seconds = time.perf_counter() - started
                wall[variant] += seconds
                job_seconds += seconds
                record = EpochRecord(variant, seed, epoch, train_loss, val_loss, val_acc, seconds)
                records.append(record)
                job_records.append(record)
                if on_epoch is not None:
                    on_epoch(variant, seed, epoch, record)
            batch_digests[_key(variant, seed)] = seen.hexdigest()
            if jobs_dir is not None:
                job = Job(
                    fingerprint,
                    job_records,
                    job_seconds,
                    start_digests[_key(variant, seed)],
                    seen.hexdigest(),
                )
                save_job(jobs_dir, variant, seed, job)
            if keep_models:
                models[_key(variant, seed)] = net
    return ExperimentResult(
        placements=list(placements),
        seeds=seed_list,
        epochs=epochs,
        dataset=data.name,
        device=str(target),
        from_pretrained=from_pretrained,
        recipe=recipe,
        records=records,
        wall_seconds=wall,
        start_digests=start_digests,
        batch_digests=batch_digests,
        models=models,
    )

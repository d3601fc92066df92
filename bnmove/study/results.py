"""What a placement study gives back: every run's metrics and epochs, the digests that prove each
seed's variants started equal, and the paired differences its verdicts come from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .jobs import EpochRecord
from .recipes import Recipe
from .runs import Run
from .stats import ACCURACY, Metric, PairedDifference, at_chance, mean_std, paired_difference


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


@dataclass
class ExperimentResult:
    """A finished placement study: every run's metrics (and, with bnmove's loop, every epoch),
    the digests that prove each seed's variants started equal, and the paired differences
    (`differences`) the verdicts come from."""

    placements: list[str]
    seeds: list[int]
    #: epochs of bnmove's loop; 0 when the user's training ran
    epochs: int
    dataset: str
    device: str
    from_pretrained: bool
    #: bnmove's loop's recipe; None when the user's training ran
    recipe: Recipe | None
    records: list[EpochRecord]
    wall_seconds: dict[str, float]
    #: sha256 of each (variant, seed)'s starting parameters, in a placement-independent order
    start_digests: dict[str, str]
    #: sha256 of the batch order each (variant, seed) saw (bnmove's loop only)
    batch_digests: dict[str, str]
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    #: how the runs computed (``float32``, ``mixed bfloat16, channels-last``...)
    precision: str = "float32"
    #: training samples BN statistics were recomputed on before each evaluation (0: running averages)
    precise_bn: int = 0
    #: each run's final metrics, by ``variant/seedN``
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: what the placements are compared on
    metric: Metric = ACCURACY
    #: who trained: ``bnmove`` (its loop), the command line, or the callable's name
    training: str = "bnmove"
    #: the validation accuracy of always answering the most common class (bnmove's loop)
    chance: float | None = None
    val_samples: int = 0
    #: what the study did that the user should know (a classifier reset, the thread count, ...)
    notes: list[str] = field(default_factory=list)
    #: bnmove's loop on the CPU: the thread count it ran with and how it was chosen
    threads: str = ""

    def summary(self) -> list[EpochSummary]:
        """Per placement and epoch, mean ± std over seeds (bnmove's loop; empty otherwise)."""
        out = []
        for variant in self.placements:
            for epoch in range(1, self.epochs + 1):
                rows = [r for r in self.records if r.variant == variant and r.epoch == epoch]
                out.append(
                    EpochSummary(
                        variant,
                        epoch,
                        *mean_std([r.train_loss for r in rows]),
                        *mean_std([r.val_loss for r in rows]),
                        *mean_std([r.val_accuracy for r in rows]),
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
        return mean_std(list(best.values()))

    def values(self, epoch: int | None = None) -> dict[str, dict[int, float]]:
        """The compared metric per placement and seed: validation accuracy at ``epoch`` (default
        the last) for bnmove's loop, each run's reported metric for the user's training."""
        if self.records:
            at = epoch or self.epochs
            return {
                v: {r.seed: r.val_accuracy for r in self.records if r.variant == v and r.epoch == at}
                for v in self.placements
            }
        return {
            v: {s: self.metrics[Run(v, s).key][self.metric.name] for s in self.seeds} for v in self.placements
        }

    def metric_summary(self, variant: str, name: str | None = None) -> tuple[float, float]:
        """Mean and std over seeds of a run metric (default: the compared one)."""
        name = name or self.metric.name
        return mean_std([self.metrics[Run(variant, s).key][name] for s in self.seeds])

    def differences(self, epoch: int | None = None) -> list[PairedDifference]:
        """Each later placement against each earlier one, paired by seed."""
        values = self.values(epoch)
        return [
            paired_difference(a, b, values, self.metric)
            for i, a in enumerate(self.placements)
            for b in self.placements[i + 1 :]
        ]

    def at_chance(self) -> str | None:
        """A warning when every run ended at chance level (the models learned nothing), else None."""
        if self.chance is None or not self.records:
            return None
        finals = [x for per_seed in self.values().values() for x in per_seed.values()]
        if not at_chance(finals, self.chance, self.val_samples):
            return None
        return (
            f"every run ended at chance level ({self.chance:.1%}, always answering the most common "
            "class): the models did not learn, so the verdict says nothing; check the labels, the "
            "learning rate and the number of epochs"
        )

    def to_dict(self) -> dict[str, Any]:
        own = bool(self.records)
        return {
            "placements": self.placements,
            "seeds": self.seeds,
            "training": self.training,
            "metric": self.metric.name,
            "higher_is_better": self.metric.higher_is_better,
            "epochs": self.epochs,
            "dataset": self.dataset,
            "device": self.device,
            "from_pretrained": self.from_pretrained,
            "precision": self.precision,
            "precise_bn": self.precise_bn,
            "recipe": self.recipe.to_dict() if self.recipe else None,
            "wall_seconds": self.wall_seconds,
            "start_digests": self.start_digests,
            "batch_digests": self.batch_digests,
            "summary": [asdict(s) for s in self.summary()],
            "best_val_accuracy": {
                v: dict(zip(("mean", "std"), self.best(v), strict=True)) for v in self.placements
            }
            if own
            else {},
            "differences": [{**asdict(d), "verdict": d.verdict()} for d in self.differences()],
            "chance_level": self.chance,
            "notes": [*self.notes, *filter(None, [self.at_chance()])],
            "metrics": self.metrics,
            "records": [asdict(r) for r in self.records],
        }

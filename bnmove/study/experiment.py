"""Answer "before or after?" on the user's own model: train every placement the same way.

For each seed, every variant starts from the same point (`bnmove.study.runs.start_model`).
The training is bnmove's own loop (`bnmove.study.loop`: same batches, optimiser and
augmentation for every variant) or the user's (`bnmove.study.own_training`: a callable or a
command). Either way the runs are kept as they finish (`bnmove.study.jobs`), so a study
resumes and a re-run trains only what is new, and placements are compared by their paired
difference per seed (`bnmove.study.stats`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.inputs import infer_example_inputs
from ..core.clone import clone_module
from ..core.progress import OnProgress, ignore
from ..core.threads import available_cores
from ..errors import BnmoveError
from .checks import _data_digest, _model_digest, match_classes
from .data import Dataset, from_torch, load_dataset
from .devices import check_devices, parse_devices
from .jobs import EpochRecord, Job, fingerprint, load_job, save_job
from .loop import LoopPlan, Precision, train_run
from .own_training import Command, Trainer, UserPlan, user_run
from .recipes import Recipe
from .results import EpochSummary, ExperimentResult
from .runner import execute
from .runs import VARIANTS, Run, weights_digest
from .stats import ACCURACY, Metric, chance_level
from .threads import ThreadChoice, choose_threads, threads_set, training_step

__all__ = ["EpochRecord", "EpochSummary", "ExperimentResult", "experiment", "weights_digest"]

log = logging.getLogger(__name__)


def _reporting(run: Run, job: Job, metric: str) -> Job:
    """``job``, if it reported the compared metric; else an error naming what it did report."""
    if metric not in job.metrics:
        raise BnmoveError(
            f"run {run.key} reported no {metric!r} (it reported: {', '.join(job.metrics) or 'nothing'}); "
            "choose one with --metric"
        )
    return job


def _training_name(train: Trainer | Command) -> str:
    if isinstance(train, Command):
        return train.template
    return f"{getattr(train, '__module__', '?')}.{getattr(train, '__qualname__', type(train).__name__)}"


@dataclass(frozen=True)
class Training:
    """How bnmove's own loop trains every variant (not for ``train=``, your own training)."""

    #: training epochs per variant and seed
    epochs: int = 5
    #: mini-batch size
    batch_size: int = 64
    #: optimiser, schedule and regularisation (default: Adam at 1e-3, constant)
    recipe: Recipe = field(default_factory=lambda: Recipe("adam", lr=1e-3))
    #: before each evaluation, recompute every BN's statistics exactly on this many training
    #: samples ("precise BN") instead of the running averages, which lag behind fast-moving
    #: weights, most of all right after a conversion; 0: off
    precise_bn: int = 0
    #: mixed precision; default on for CUDA
    amp: bool | None = None
    #: the channels-last memory layout; default on for CUDA
    channels_last: bool | None = None
    #: deterministic kernels only, so a re-run on CUDA repeats bit for bit (at a cost in speed;
    #: see [`on_device`][bnmove.study.devices.on_device]); on the CPU, give ``threads`` too
    deterministic: bool = False
    #: CPU threads, one run at a time on the CPU (default: one thread on busy cores, else the
    #: faster of one thread and every core on a training step; see `bnmove.study.threads`)
    threads: int | None = None


@dataclass(frozen=True)
class Execution:
    """Where the runs happen, and what is kept of them."""

    #: ``"cuda"`` when available unless given (or ``devices``)
    device: str | None = None
    #: spread the runs over these devices (``("cuda:0", "cuda:1")``), one run per device at a
    #: time unless ``jobs`` says more
    devices: Sequence[str] | None = None
    #: runs at once, in worker processes (default: one per device in ``devices``, else 1)
    jobs: int | None = None
    #: ``"local"`` (this machine) or ``"ray"`` (tasks on the Ray cluster ``ray.init()`` connects
    #: to; ``RAY_ADDRESS`` names one)
    backend: str = "local"
    #: keep each finished run here: an interrupted study resumes, a finished one re-reports
    jobs_dir: Path | None = None
    #: keep each run's trained model (``ExperimentResult.models``)
    keep_models: bool = False


def _loop_plan(
    model: nn.Module,
    data: Dataset,
    loop: Training,
    where: Execution,
    target: torch.device,
    from_pretrained: bool,
    settings: dict[str, Any],
) -> LoopPlan:
    """What bnmove's loop runs for every (placement, seed), and the settings its runs are kept by."""
    precision = Precision.choose(target, data.sample(2), loop.amp, loop.channels_last, loop.deterministic)
    settings |= {
        "training": "bnmove",
        "epochs": loop.epochs,
        "batch_size": loop.batch_size,
        "recipe": loop.recipe.to_dict(),
        "precision": precision.describe(),
        **({"precise_bn": loop.precise_bn} if loop.precise_bn else {}),
    }
    return LoopPlan(
        clone_module(model).cpu(), data, loop.epochs, loop.batch_size, loop.recipe, from_pretrained,
        precision, where.keep_models, loop.precise_bn, settings, fingerprint(settings),
    )  # fmt: skip


def _thread_choice(plan: LoopPlan, threads: int | None) -> ThreadChoice:
    """The loop's CPU threads: as given, or chosen on one of its training steps."""
    if threads is not None and threads < 1:
        raise BnmoveError("threads must be at least 1")
    if threads is not None:
        return ThreadChoice(threads)
    return choose_threads(training_step(plan.model, plan.data, plan.batch_size), available_cores())


def experiment(
    model: nn.Module,
    data: Dataset
    | torch.utils.data.Dataset[Any]
    | torch.utils.data.DataLoader[Any]
    | tuple[Any, ...]
    | None = None,
    *,
    placements: Sequence[str] = ("before", "after"),
    seeds: int | Sequence[int] = 3,
    from_pretrained: bool = False,
    training: Training | None = None,
    execution: Execution | None = None,
    train: Trainer | str | None = None,
    metric: str | None = None,
    higher_is_better: bool = True,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    on_progress: OnProgress | None = None,
) -> ExperimentResult:
    """Train each placement variant of ``model`` under identical conditions and compare them.

    Args:
        model: the architecture (and, with ``from_pretrained``, the weights); not modified.
        data: what ``--data`` takes (``"digits"``, an ``.npz``, an image folder, a CIFAR folder:
            read by [`bnmove.study.load_dataset`][bnmove.study.load_dataset]), a loaded [`bnmove.study.Dataset`][bnmove.study.Dataset], or a
            ``torch.utils.data.Dataset``/``DataLoader`` of ``(x, y)``, or a
            ``(train, val)`` pair of them (streamed in an order bnmove sets per seed). Optional
            with ``train``: then it only gives example inputs and checks the class count.
        placements: variants to train: ``"before"``, ``"after"`` and/or ``"original"``.
        seeds: a number of seeds (0..K-1) or the seeds themselves.
        from_pretrained: start from the model's weights (converted with ``auto``)
            instead of a fresh initialisation (converted with ``swap``).
        training: how bnmove's loop trains ([`Training`][bnmove.study.Training]: epochs, batch size,
            recipe, precise BN, precision, threads); not with ``train``.
        execution: where the runs happen ([`Execution`][bnmove.study.Execution]: device(s), worker
            processes, Ray) and what is kept (``jobs_dir``: each finished (placement, seed) run,
            taken instead of training it again, so an interrupted study resumes and a finished one
            re-reports, new seeds or placements train only what is new; runs made with other
            settings, model or data are refused with what changed; a command's run folders go
            there too. ``keep_models``: the trained models, in ``result.models``).
        train: the user's training instead of bnmove's loop: a callable
            ``train(model, seed, device) -> {"val_accuracy": 0.93, ...}`` that trains and evaluates
            the variant it is given (on ``device``), or a command line with placeholders
            (``"python train.py --model {model} --seed {seed} --out {out}"``, see
            `bnmove.study.own_training`; needs ``execution.jobs_dir``). With worker processes
            (``jobs``), a callable must be importable (defined at a module's top level).
        metric: the reported metric the placements are compared on (default ``val_accuracy``).
        higher_is_better: whether a larger ``metric`` is better (False for a loss).
        example_inputs: inputs to trace the model with when ``data`` is not given (default:
            inferred from its first layer).
        on_progress: given each run's events as they happen: ``RunStarted`` (variant, seed,
            device), an ``EpochRecord`` after every epoch of bnmove's loop, ``RunFinished``
            (variant, seed, metrics); see `bnmove.core.progress`.

    Returns:
        An [`ExperimentResult`][bnmove.ExperimentResult] with per-run metrics (and per-epoch records for bnmove's loop),
        paired differences and digests; runs are listed by seed and placement whatever order they
        finished in.
    """
    data = _as_dataset(data)
    if train is not None and training is not None:
        raise BnmoveError("training= is for bnmove's loop; with train= your own training trains")
    loop, where = training or Training(), execution or Execution()
    seed_list = _check_study(placements, seeds, loop)
    targets = parse_devices(
        where.devices or [where.device or ("cuda" if torch.cuda.is_available() else "cpu")]
    )
    check_devices(targets)
    model, notes, settings = _prepared(model, data, from_pretrained)
    if train is None:
        if metric not in (None, ACCURACY.name):
            raise BnmoveError("bnmove's loop compares val_accuracy; metric= is for your own training")
        chosen = _Chosen.loop(model, data, loop, where, targets[0], from_pretrained, settings)
    else:
        compared = Metric(metric or ACCURACY.name, higher_is_better, percent=False)
        chosen = _Chosen.own(model, data, train, compared, where, from_pretrained, settings, example_inputs)
    thread_note, count = "", threads_set(torch.get_num_threads())  # as it is, unless chosen below
    single = where.backend == "local" and (where.jobs or len(targets)) == 1 and targets[0].type == "cpu"
    if isinstance(chosen.plan, LoopPlan) and single:  # one run at a time on the CPU: bnmove's loop chooses
        choice = _thread_choice(chosen.plan, loop.threads)
        thread_note = choice.describe()
        notes.append(f"threads: {thread_note}")
        count = threads_set(choice.threads)
    runs = [Run(v, s) for s in seed_list for v in placements]
    with count:
        finished, models = _run_all(
            chosen, runs, settings, [str(t) for t in targets], where, on_progress or ignore
        )
    return ExperimentResult(
        placements=list(placements),
        seeds=seed_list,
        epochs=loop.epochs if train is None else 0,
        dataset=data.name if data is not None else "your data",
        device=", ".join(str(t) for t in targets),
        from_pretrained=from_pretrained,
        recipe=chosen.recipe,
        records=[r for run in runs for r in finished[run].records],
        wall_seconds={v: sum(finished[r].seconds for r in runs if r.variant == v) for v in placements},
        start_digests={run.key: finished[run].start_digest for run in runs},
        batch_digests={run.key: finished[run].batch_digest for run in runs if finished[run].batch_digest},
        models=models,
        precision=chosen.precision.describe(),
        precise_bn=loop.precise_bn,
        metrics={run.key: finished[run].metrics for run in runs},
        metric=chosen.metric,
        training=settings["training"],
        chance=_chance(data),
        val_samples=len(data.val) if data is not None else 0,
        notes=notes,
        threads=thread_note,
    )


def _prepared(
    model: nn.Module, data: Dataset | None, from_pretrained: bool
) -> tuple[nn.Module, list[str], dict[str, Any]]:
    """The model with a head for the data's classes (and a note where it was reset), and the
    settings every kept run must have been made with."""
    notes: list[str] = []
    if data is not None:
        model, reset = match_classes(model, data)
        if reset:
            log.info(reset)
            notes.append(reset)
    settings: dict[str, Any] = {
        "model": _model_digest(model, from_pretrained),
        "from_pretrained": from_pretrained,
    }
    if data is not None:
        settings["data"] = _data_digest(data)
    return model, notes, settings


def _chance(data: Dataset | None) -> float | None:
    """The validation accuracy of always answering the most common class (None without labels)."""
    if data is None or data.num_classes is None:
        return None
    labels = data.val.labels
    return chance_level(labels.tolist() if labels is not None else None, data.num_classes)


def _as_dataset(data: Any) -> Dataset | None:
    """What ``experiment`` takes as data, as a `Dataset` (a path is loaded, torch data wrapped)."""
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data if isinstance(data, str) else Path(data))
    if data is not None and not isinstance(data, Dataset):  # torch Datasets/DataLoaders
        return from_torch(*(data if isinstance(data, tuple) else (data,)))
    return data


def _check_study(placements: Sequence[str], seeds: int | Sequence[int], loop: Training) -> list[int]:
    """One clear error for a study that cannot run; its seeds."""
    unknown = [p for p in placements if p not in VARIANTS]
    if unknown or not placements:
        raise BnmoveError(
            f"unknown placement {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}"
        )
    if loop.epochs < 1 or loop.batch_size < 1:
        raise BnmoveError("epochs and batch size must be at least 1")
    if loop.precise_bn < 0:
        raise BnmoveError("precise_bn is a number of training samples, 0 or more")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise BnmoveError("give at least one seed")
    return seed_list


@dataclass(frozen=True)
class _Chosen:
    """Who trains each run: bnmove's loop or the user's training, with its plan and what it reports."""

    plan: LoopPlan | UserPlan
    run_one: Callable[..., Any]
    metric: Metric
    recipe: Recipe | None
    precision: Precision

    @classmethod
    def loop(
        cls,
        model: nn.Module,
        data: Dataset | None,
        loop: Training,
        where: Execution,
        target: torch.device,
        from_pretrained: bool,
        settings: dict[str, Any],
    ) -> _Chosen:
        if data is None:
            raise BnmoveError("bnmove's training loop needs data; or pass train= for your own training")
        plan = _loop_plan(model, data, loop, where, target, from_pretrained, settings)
        return cls(plan, train_run, ACCURACY, loop.recipe, plan.precision)

    @classmethod
    def own(
        cls,
        model: nn.Module,
        data: Dataset | None,
        train: Trainer | str,
        metric: Metric,
        where: Execution,
        from_pretrained: bool,
        settings: dict[str, Any],
        example_inputs: tuple[torch.Tensor, ...] | None,
    ) -> _Chosen:
        trainer = Command(train) if isinstance(train, str) else train
        if isinstance(trainer, Command) and where.jobs_dir is None:
            raise BnmoveError("a training command needs jobs_dir: the folder for each run's model and output")
        example = (data.sample(2),) if data is not None else example_inputs or infer_example_inputs(model)
        settings["training"] = _training_name(trainer)
        plan = UserPlan(
            clone_module(model).cpu(), example, from_pretrained, trainer, where.jobs_dir, where.keep_models,
            settings, fingerprint(settings),
        )  # fmt: skip
        return cls(plan, user_run, metric, None, Precision())


def _run_all(
    chosen: _Chosen,
    runs: list[Run],
    settings: dict[str, Any],
    devices: list[str],
    where: Execution,
    on_event: OnProgress,
) -> tuple[dict[Run, Job], dict[str, nn.Module]]:
    """Every run: those kept in ``jobs_dir`` taken as they are, the others trained (each kept as it
    finishes); the models, where kept."""
    jobs_dir = where.jobs_dir
    finished: dict[Run, Job] = {}
    for run in runs:
        done = load_job(jobs_dir, run.variant, run.seed, settings) if jobs_dir is not None else None
        if done is not None:
            finished[run] = _reporting(run, done, chosen.metric.name)
    models: dict[str, nn.Module] = {}
    for result in execute(
        chosen.run_one,
        chosen.plan,
        [run for run in runs if run not in finished],
        devices=devices,
        jobs=where.jobs or len(devices),
        backend=where.backend,
        on_event=on_event,
    ):
        if jobs_dir is not None:  # kept before the metric is checked: fixing --metric reuses it
            save_job(jobs_dir, result.run.variant, result.run.seed, result.job)
        finished[result.run] = _reporting(result.run, result.job, chosen.metric.name)
        if result.model is not None:
            models[result.run.key] = result.model
    return finished, models

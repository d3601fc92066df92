"""The placement study (bnmove experiment)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from ..core.atomic import atomic_path
from ..study.experiment import ExperimentResult
from ._shared import WIDE_TABLE, has_matplotlib, require_matplotlib


def _pm(mean: float, std: float, pct: bool = False, compact: bool = False) -> str:
    if compact:  # fits 80 columns: no spaces around ±, losses to three decimals
        return f"{mean:.1%}±{std:.1%}" if pct else f"{mean:.3f}±{std:.3f}"
    return f"{mean:.1%} ± {std:.1%}" if pct else f"{mean:.4f} ± {std:.4f}"


def _pm_metric(result: ExperimentResult, variant: str, name: str, compact: bool = False) -> str:
    """Mean ± std of any metric, both to the decimals of the std's two significant digits."""
    mean, std = result.metric_summary(variant, name)
    sep = "±" if compact else " ± "
    if std <= 0 or not math.isfinite(std):
        return f"{mean:.4g}{sep}0"
    decimals = max(0, 1 - math.floor(math.log10(std)))
    return f"{mean:.{decimals}f}{sep}{std:.{decimals}f}"


def experiment_header(result: ExperimentResult) -> str:
    start = "converted pretrained weights" if result.from_pretrained else "one random initialisation per seed"
    if result.recipe is None:  # the user's training
        return (
            f"{result.metric.name} ({'higher' if result.metric.higher_is_better else 'lower'} is better) "
            f"from your training ({result.training}), {len(result.seeds)} seeds on {result.device}; "
            f"each seed's variants start from {start}; mean ± std over seeds"
        )
    return (
        f"{result.dataset}: {result.epochs} epochs × {len(result.seeds)} seeds on {result.device} "
        f"({result.recipe.describe()}; {result.precision}"
        + (f"; BN statistics recomputed on {result.precise_bn} samples" if result.precise_bn else "")
        + f"), each seed's variants start from {start}; "
        "mean ± std over seeds"
    )


def _best_placement(result: ExperimentResult) -> str:
    values = result.values()
    pick = max if result.metric.higher_is_better else min
    return pick(result.placements, key=lambda v: sum(values[v].values()) / len(values[v]))


def experiment_table(result: ExperimentResult, width: int | None = None) -> Table:
    """One row per placement; below `WIDE_TABLE` columns a compact form that fits 80."""
    compact = width is not None and width < WIDE_TABLE
    table = Table()  # no title: it would wrap to the table's width; print experiment_header above

    own = result.recipe is not None
    columns = (
        ("placement", "val accuracy", "best epoch", "val loss", "train loss", "time")
        if own
        else ("placement", result.metric.name, "time")
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "placement" else "right", no_wrap=True)
    best = _best_placement(result)
    for variant in result.placements:
        name = f"[bold]{variant}[/]" if variant == best and len(result.placements) > 1 else variant
        seconds = f"{result.wall_seconds[variant]:.1f} s"
        if not own:
            table.add_row(name, _pm_metric(result, variant, result.metric.name, compact), seconds)
            continue
        final = result.final(variant)
        table.add_row(
            name,
            _pm(final.val_accuracy, final.val_accuracy_std, pct=True, compact=compact),
            _pm(*result.best(variant), pct=True, compact=compact),
            _pm(final.val_loss, final.val_loss_std, compact=compact),
            _pm(final.train_loss, final.train_loss_std, compact=compact),
            seconds,
        )
    return table


def experiment_lines(result: ExperimentResult) -> list[str]:
    """The verdicts, then what the user should know about the study (chance level, the CPU
    threads bnmove's loop chose)."""
    lines = [d.verdict() for d in result.differences()]
    warning = result.at_chance()
    lines += [f"note: {warning}"] if warning else []
    return lines + ([f"CPU threads: {result.threads}"] if result.threads else [])


def experiment_markdown(result: ExperimentResult) -> str:
    lines = ["# BatchNorm placement experiment", "", experiment_header(result), ""]
    if result.recipe is None:
        names = sorted({name for metrics in result.metrics.values() for name in metrics})
        shared = [n for n in names if all(n in m for m in result.metrics.values())]
        lines += ["| placement | " + " | ".join(shared) + " |", "|---|" + "---:|" * len(shared)]
        for v in result.placements:
            lines.append(f"| {v} | " + " | ".join(_pm_metric(result, v, n) for n in shared) + " |")
        lines.append("")
    else:
        lines += ["| placement | epoch | val accuracy | val loss | train loss |", "|---|---:|---:|---:|---:|"]
        for s in result.summary():
            lines.append(
                f"| {s.variant} | {s.epoch} | {_pm(s.val_accuracy, s.val_accuracy_std, pct=True)} | "
                f"{_pm(s.val_loss, s.val_loss_std)} | {_pm(s.train_loss, s.train_loss_std)} |"
            )
        lines += [
            "",
            "Best epoch's validation accuracy per run, mean ± std over seeds: "
            + ", ".join(f"{v} {_pm(*result.best(v), pct=True)}" for v in result.placements),
            "",
        ]
    lines += [
        "Training time per placement (all seeds, summed over runs): "
        + ", ".join(f"{v} {t:.1f} s" for v, t in result.wall_seconds.items()),
        "",
    ]
    if result.differences():
        what = "final validation accuracy" if result.recipe else result.metric.name
        same = "same batches" if result.recipe else "same start"
        lines += [f"## Paired differences ({what}, same seed, {same})", ""]
        lines += [f"- {line}" for line in experiment_lines(result)]
        lines.append("")
    if result.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in result.notes), ""]
    return "\n".join(lines)


def experiment_json(result: ExperimentResult) -> str:
    return json.dumps(result.to_dict(), indent=2) + "\n"


def experiment_plot(result: ExperimentResult, path: Path) -> None:
    """Validation accuracy and training loss per epoch, mean with a ±std band, per placement, and
    the paired difference between placements per epoch with its 95% interval."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if result.recipe is None:
        _paired_plot(result, path, plt)
        return
    pairs = result.differences()
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(15 if pairs else 10, 4))
    ax_acc, ax_loss = axes[0], axes[1]
    for variant in result.placements:
        rows = [s for s in result.summary() if s.variant == variant]
        epochs = [s.epoch for s in rows]
        for ax, mean, std in (
            (ax_acc, [s.val_accuracy for s in rows], [s.val_accuracy_std for s in rows]),
            (ax_loss, [s.train_loss for s in rows], [s.train_loss_std for s in rows]),
        ):
            ax.plot(epochs, mean, marker="o", label=variant)
            ax.fill_between(
                epochs,
                [m - d for m, d in zip(mean, std, strict=True)],
                [m + d for m, d in zip(mean, std, strict=True)],
                alpha=0.2,
            )
    ax_acc.set_ylabel("validation accuracy")
    ax_loss.set_ylabel("training loss")
    if pairs:  # the paired difference per epoch, with its 95% interval where there are 2+ seeds
        ax_diff = axes[2]
        epochs = list(range(1, result.epochs + 1))
        for index, pair in enumerate(pairs):
            per_epoch = [result.differences(e)[index] for e in epochs]
            mean = [100 * d.mean for d in per_epoch]
            ax_diff.plot(epochs, mean, marker="o", label=f"{pair.b} − {pair.a}")
            if all(d.low is not None and d.high is not None for d in per_epoch):
                low = [100 * d.low for d in per_epoch]  # type: ignore[operator]
                high = [100 * d.high for d in per_epoch]  # type: ignore[operator]
                ax_diff.fill_between(epochs, low, high, alpha=0.2)
        ax_diff.axhline(0, color="grey", linewidth=0.8)
        ax_diff.set_ylabel("paired difference, points (95% CI)")
    for index, ax in enumerate(axes):
        ax.set_xticks(range(1, result.epochs + 1))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(title="paired by seed" if index == 2 else "BN placement")
    fig.suptitle(experiment_header(result), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _paired_plot(result: ExperimentResult, path: Path, plt: Any) -> None:
    """The user's training: each seed's metric per placement, joined by seed, and the mean."""
    fig, ax = plt.subplots(figsize=(6, 4))
    values = result.values()
    positions = range(len(result.placements))
    for seed in result.seeds:
        ax.plot(positions, [values[v][seed] for v in result.placements], color="grey", alpha=0.5, marker="o")
    means = [sum(values[v].values()) / len(values[v]) for v in result.placements]
    ax.plot(positions, means, color="black", marker="D", linewidth=2, label="mean over seeds")
    ax.set_xticks(list(positions), result.placements)
    ax.set_ylabel(result.metric.name)
    ax.grid(True, alpha=0.3)
    ax.legend(title="grey: one seed")
    fig.suptitle(experiment_header(result), fontsize=7, wrap=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_experiment(result: ExperimentResult, folder: Path) -> list[Path]:
    """``results.json``, ``summary.md`` and (with matplotlib) ``curves.png`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, render in (("results.json", experiment_json), ("summary.md", experiment_markdown)):
        with atomic_path(folder / name) as tmp:
            tmp.write_text(render(result))
        written.append(folder / name)
    if has_matplotlib():
        experiment_plot(result, folder / "curves.png")
        written.append(folder / "curves.png")
    return written

"""Rendering only: tables, summaries, Markdown, CSV, JSON and plots of bnmove's results."""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from .analysis.detect import Pair
from .analysis.tracing import Untraced
from .core.atomic import atomic_path
from .deploy.accuracy import Accuracy
from .deploy.runtime import Comparison, OutputDeviation, VariantInfo
from .errors import BnmoveError
from .pipeline.results import Conversion, Move
from .study.experiment import ExperimentResult
from .study.stats import ACCURACY


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


#: below this many columns the pair and conversion tables switch to their compact form
WIDE_TABLE = 120


def _pair_label(bn: str, activation: str | None, kind: str | None) -> str:
    """``blocks.0.bn1 → act1 (ReLU)``: the activation by its own name where it shares the BN's parent
    (a bare Sequential index would not read as a name, so ``features.1 → features.2`` stays whole)."""
    if activation is None:
        return f"{bn} (no activation)"
    parent, _, name = activation.rpartition(".")
    if parent and parent == bn.rpartition(".")[0] and not name.isdigit():
        activation = name
    return f"{bn} → {activation} ({kind})"


def pairs_table(pairs: Sequence[Pair], width: int | None = None) -> Table:
    """One row per BN; below :data:`WIDE_TABLE` columns the compact form (see :func:`conversion_table`),
    where ``move`` says how the pair would move: exact, exact+affine, fit (approximate) or no."""
    compact = width is not None and width < WIDE_TABLE
    table = Table(
        title="BatchNorm–activation pairs",
        title_justify="left",
        expand=compact,
        width=width if compact else None,
    )
    if compact:
        table.add_column("BN → activation (kind)", overflow="fold", ratio=5, min_width=16)
        table.add_column("placement", no_wrap=True)
        table.add_column("move", no_wrap=True)
        table.add_column("reason", overflow="fold", ratio=4, min_width=18)
    else:
        for column in ("BN", "activation", "kind", "placement", "movable", "exact", "reason"):
            table.add_column(column, overflow="fold")
    for pair in pairs:
        bn = pair.bn + (" (fused)" if pair.fused else "")
        if compact:
            if not pair.movable:
                move = "no"
            elif pair.keeps_affine:
                move = "[green]exact+affine[/]"
            else:
                move = "[green]exact[/]" if pair.exact else "[cyan]fit[/]"
            label = _pair_label(bn, pair.activation, pair.activation_kind)
            table.add_row(label, pair.placement or "—", move, pair.reason or "")
            continue
        table.add_row(
            bn,
            pair.activation or "—",
            pair.activation_kind or "—",
            pair.placement or "not adjacent",
            _yes(pair.movable),
            ("[green]yes[/] (kept affine)" if pair.keeps_affine else _yes(pair.exact)),
            pair.reason or "",
        )
    return table


def pairs_summary(pairs: Sequence[Pair]) -> str:
    if not pairs:
        return "no BatchNorm found: nothing to move"
    placed = Counter(p.placement for p in pairs if p.placement)
    adjacent = sum(placed.values())
    lone = len(pairs) - adjacent
    movable = sum(p.movable for p in pairs)
    exact = sum(p.exact for p in pairs)
    kept = sum(p.keeps_affine for p in pairs)
    parts = [
        f"{adjacent} pairs ({placed['before']} BN before activation, {placed['after']} after)",
        f"{movable} movable",
        f"{exact} exactly" + (f" ({kept} keeping the BN's affine as a layer)" if kept else ""),
    ]
    if lone:
        parts.append(f"{lone} BatchNorm not adjacent to an activation")
    return ", ".join(parts)


def untraced_lines(untraced: Sequence[Untraced]) -> list[str]:
    return [
        f"not traced: {u.name} ({u.type_name}): {u.reason}; pairs inside its own forward are not seen"
        for u in untraced
    ]


_METHOD_LABEL = {
    "exact": "folded exactly",
    "exact-kept-affine": "exact with kept affine",
    "fit-data-free": "fitted to Gaussian statistics",
    "fit-calibrated": "fitted on data",
    "fit-synthetic": "fitted on synthetic inputs",
    "swap": "swapped",
}


_SHORT_LABEL = {
    "exact": "exact",
    "exact-kept-affine": "exact+affine",
    "fit-data-free": "fit (Gaussian)",
    "fit-calibrated": "fit (data)",
    "fit-synthetic": "fit (synthetic)",
    "swap": "swap",
}


def _move_result(move: Move, short: bool) -> str:
    method = move.method or "exact"
    if move.absorbed is not None:  # stays, and its BN took in a kept affine by fitting
        labels = _SHORT_LABEL if short else _METHOD_LABEL
        return f"[cyan]{'absorbed' if short else 'stays, affine absorbed'} ({labels.get(method, method)})[/]"
    if not move.moved:
        return "stays"
    if move.keeps_outputs:
        colour = "green"
    elif method.startswith("fit"):
        colour = "cyan"
    else:
        colour = "yellow"
    if short:
        return f"[{colour}]{_SHORT_LABEL.get(method, method)}[/]"
    text = "swap: function changed" if method == "swap" else _METHOD_LABEL.get(method, method)
    return f"[{colour}]moved ({text})[/]"


def conversion_table(conversion: Conversion, width: int | None = None) -> Table:
    """One row per BN. At ``width`` columns below :data:`WIDE_TABLE` (a terminal's) the
    compact form: BN and activation share a cell, ``was`` goes (a moved pair was on the other side;
    a staying one says why in its note) and results are short labels, so the note keeps its room."""
    title = f"Moves to placement '{conversion.placement}'"
    compact = width is not None and width < WIDE_TABLE
    table = Table(title=title, title_justify="left", expand=compact, width=width if compact else None)
    if compact:
        table.add_column("BN → activation (kind)", overflow="fold", ratio=5, min_width=16)
        table.add_column("result", no_wrap=True)
        table.add_column("note", overflow="fold", ratio=4, min_width=18)
    else:
        for column in ("BN", "activation", "kind", "was", "result", "note"):
            table.add_column(column, overflow="fold")
    for move in conversion.moves:
        pair = move.pair
        note = "; ".join(filter(None, [move.reason, *move.notes]))
        result = _move_result(move, short=compact)
        if compact:
            table.add_row(_pair_label(pair.bn, pair.activation, pair.activation_kind), result, note)
        else:
            table.add_row(
                pair.bn,
                pair.activation or "—",
                pair.activation_kind or "—",
                pair.placement or "not adjacent",
                result,
                note,
            )
    return table


def conversion_summary(conversion: Conversion) -> str:
    moved = conversion.moved
    counts = Counter(_METHOD_LABEL.get(m.method or "", m.method) for m in moved)
    adjacent = sum(m.pair.placement is not None for m in conversion.moves)
    detail = ", ".join(f"{n} {label}" for label, n in counts.items()) or "none"
    absorbed = conversion.absorbed
    if absorbed:
        how = Counter(_METHOD_LABEL.get(m.method or "", m.method) for m in absorbed)
        fitted = ", ".join(f"{n} {label}" for label, n in how.items())
        text = f"absorbed {len(absorbed)} kept affine layer{'s' if len(absorbed) > 1 else ''} into their BNs ({fitted})"
        if moved:
            text += f"; moved {len(moved)} of {adjacent} BN–activation pairs ({detail})"
    elif moved:
        text = f"moved {len(moved)} of {adjacent} BN–activation pairs ({detail})"
    elif not adjacent:
        text = "nothing moved: the model has no BatchNorm next to an activation"
    else:
        text = (
            f"nothing moved: none of the {adjacent} BN–activation pairs needed or allowed a move to "
            f"'{conversion.placement}' (the table says why)"
        )
    dev = conversion.verification
    if dev is not None:
        shapes = ", ".join("x".join(map(str, s)) for s in dev.input_shapes)
        text += (
            f"; eval outputs on {shapes}: max abs error {dev.max_abs_error:.3g}, "
            f"relative {dev.max_rel_error:.3g}"
        )
        if any(m.method == "swap" for m in moved):
            text += " (swaps change the function: retrain or fine-tune)"
        elif any((m.method or "").startswith("fit") for m in [*moved, *absorbed]):
            text += " (fits approximate the function)"
    # Held-out first: the fits never saw those samples, so that is the figure to trust.
    for check, what in (
        (conversion.held_out, "held-out calibration samples (not used by the fits)"),
        (conversion.calibration, "calibration samples the fits used"),
    ):
        if check is not None:
            text += f"; on {check.samples} {what}: max abs error {check.max_abs_error:.3g}"
            if check.top1_agreement is not None:
                text += f", top-1 agreement {check.top1_agreement:.1%}"
    return text


# -- comparison (bnmove compare) -------------------------------------------------------


def _deviation_of(comparison: Comparison, variant: str) -> OutputDeviation | None:
    return next((d for d in comparison.deviations if d.variant == variant), None)


def _top1(dev: OutputDeviation | None) -> str:
    return "—" if dev is None or dev.top1_agreement is None else f"{dev.top1_agreement:.1%}"


def _ops_summary(info: VariantInfo, top: int = 4) -> str:
    return ", ".join(f"{k}×{v}" for k, v in list(info.optimized_nodes.items())[:top])


def _rows(comparison: Comparison) -> list[dict[str, Any]]:
    """One flat row per variant and batch size: the shared source of table, CSV and Markdown."""
    infos = {v.name: v for v in comparison.variants}
    accuracies = {a.variant: a for a in comparison.accuracies}
    rows = []
    for t in comparison.timings:
        dev = _deviation_of(comparison, t.variant)
        info = infos[t.variant]
        rows.append(
            {
                "variant": t.variant,
                "batch": t.batch_size,
                "mean_ms": t.mean_ms,
                "p50_ms": t.p50_ms,
                "p90_ms": t.p90_ms,
                "p99_ms": t.p99_ms,
                "throughput": t.throughput,
                "ratio": t.ratio,
                "max_abs": dev.max_abs if dev else None,
                "mean_abs": dev.mean_abs if dev else None,
                "cosine": dev.cosine if dev else None,
                "top1": dev.top1_agreement if dev else None,
                "deviates": bool(dev and dev.deviates),
                "nodes": sum(info.optimized_nodes.values()),
                "batchnorms": info.batchnorms,
                "file_size": info.file_size,
                **({"accuracy": accuracies[t.variant].accuracy} if t.variant in accuracies else {}),
            }
        )
    return rows


def accuracy_cells(acc: Accuracy) -> tuple[str, str, str]:
    """``97.2%``, ``95.6–98.3%`` and ``+0.3 (−0.2 to +0.8)`` (points, against the reference)."""
    interval = f"{100 * acc.low:.1f}–{100 * acc.high:.1f}%"
    if acc.difference is None or acc.difference_low is None or acc.difference_high is None:
        return f"{acc.accuracy:.1%}", interval, "reference"
    points = [
        ACCURACY.amount(d, signed=True) for d in (acc.difference, acc.difference_low, acc.difference_high)
    ]
    diff = f"{points[0]} ({points[1]} to {points[2]})"
    return f"{acc.accuracy:.1%}", interval, diff


def accuracy_table(comparison: Comparison) -> Table:
    """Top-1 accuracy per variant on the labelled data, with intervals and paired differences."""
    n = comparison.accuracies[0].samples
    table = Table(title=f"top-1 accuracy on {n:,} labelled samples", title_justify="left")
    table.add_column("variant")
    table.add_column("top-1", justify="right")
    table.add_column("95% CI", justify="right")
    table.add_column(f"− {comparison.reference}, points (95% CI)", justify="right")
    for acc in comparison.accuracies:
        table.add_row(acc.variant, *accuracy_cells(acc))
    return table


#: marks a variant whose outputs are not the reference's (a fit or a swap, or a bug)
DEVIATES = "≠"


def _variant_label(row: dict[str, Any]) -> str:
    return f"{row['variant']} {DEVIATES}" if row["deviates"] else str(row["variant"])


def deviation_note(comparison: Comparison) -> str | None:
    """One line naming the variants whose outputs differ from the reference beyond float rounding."""
    bad = [d for d in comparison.deviations if d.deviates]
    if not bad:
        return None
    parts = ", ".join(f"{d.variant} (max |Δ| {d.max_abs:.3g}, {d.max_rel:.2g} relative)" for d in bad)
    return f"{DEVIATES} outputs differ from '{comparison.reference}' beyond float rounding: {parts}"


def comparison_header(comparison: Comparison) -> str:
    return (
        f"onnxruntime {comparison.onnxruntime} on {comparison.provider.upper()} ({comparison.device}), "
        f"{comparison.created}; ratios and deviations against '{comparison.reference}'; "
        "latency ms: median (p50) with p90/p99, throughput and ratios from the median"
    )


#: compare's columns, most important first; a narrow terminal drops them from the end of this list
_COMPARE_DROP_ORDER = ("size", "cosine", "p99", "nodes (BN)", "p90", "max |Δ|")
#: about how many characters each compare column needs, borders included
_COMPARE_WIDTHS = {
    "variant": 12, "batch": 8, "p50 ms": 9, "p90": 9, "p99": 9, "samples/s": 12, "ratio": 8,
    "max |Δ|": 11, "cosine": 11, "top-1": 9, "nodes (BN)": 13, "size": 10,
}  # fmt: skip


def comparison_table(comparison: Comparison, width: int | None = None) -> Table:
    """The compare table; at ``width`` columns (a terminal's) it drops the least important columns
    (size, cosine, p99, node counts, p90, max |Δ|, in that order) so the rest stay readable."""
    table = Table(title=comparison_header(comparison), title_justify="left")
    cells: dict[str, Callable[[dict[str, Any]], str]] = {
        "variant": _variant_label,
        "batch": lambda r: str(r["batch"]),
        "p50 ms": lambda r: f"{r['p50_ms']:.3f}",
        "p90": lambda r: f"{r['p90_ms']:.3f}",
        "p99": lambda r: f"{r['p99_ms']:.3f}",
        "samples/s": lambda r: f"{r['throughput']:,.0f}",
        "ratio": lambda r: f"{r['ratio']:.2f}×",
        "max |Δ|": lambda r: f"{r['max_abs']:.2e}" if r["max_abs"] is not None else "—",
        "cosine": lambda r: f"{r['cosine']:.6f}" if r["cosine"] is not None else "—",
        "top-1": lambda r: _top1(_deviation_of(comparison, r["variant"])),
        "nodes (BN)": lambda r: f"{r['nodes']} ({r['batchnorms']})",
        "size": lambda r: f"{r['file_size'] / 1e6:.2f} MB",
    }
    columns = list(cells)
    for dropped in _COMPARE_DROP_ORDER:
        if width is None or sum(_COMPARE_WIDTHS[c] for c in columns) <= width:
            break
        columns.remove(dropped)
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for r in _rows(comparison):
        table.add_row(*(cells[c](r) for c in columns))
    return table


def comparison_ops_lines(comparison: Comparison) -> list[str]:
    return [f"{v.name}: {_ops_summary(v, 6)}" for v in comparison.variants]


def comparison_csv(comparison: Comparison) -> str:
    rows = _rows(comparison)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["variant"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def comparison_markdown(comparison: Comparison) -> str:
    lines = ["# Placement variants under onnxruntime", "", comparison_header(comparison), ""]
    lines += [
        "| variant | batch | p50 ms | p90 | p99 | samples/s | ratio | max abs dev | cosine | top-1 | nodes (BN) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in _rows(comparison):
        top1 = _top1(_deviation_of(comparison, r["variant"]))
        lines.append(
            f"| {_variant_label(r)} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['throughput']:,.0f} | {r['ratio']:.2f}× | {r['max_abs']:.2e} | "
            f"{r['cosine']:.6f} | {top1} | {r['nodes']} ({r['batchnorms']}) |"
        )
    note = deviation_note(comparison)
    if note:
        lines += ["", note]
    if comparison.accuracies:
        n = comparison.accuracies[0].samples
        lines += [
            "",
            f"Top-1 accuracy on {n:,} labelled samples (95% Wilson interval; difference from "
            f"'{comparison.reference}' paired on the same samples, 95% t interval):",
            "",
            f"| variant | top-1 | 95% CI | − {comparison.reference}, points (95% CI) |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {a.variant} | " + " | ".join(accuracy_cells(a)) + " |" for a in comparison.accuracies]
    lines += ["", "Nodes after onnxruntime's optimisations:", ""]
    lines += [
        f"- **{v.name}** ({v.file_size / 1e6:.2f} MB): {_ops_summary(v, 8)}" for v in comparison.variants
    ]
    return "\n".join(lines) + "\n"


def comparison_json(comparison: Comparison) -> str:
    return json.dumps(comparison.to_dict(), indent=2) + "\n"


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib() -> None:
    """Fail early (before any work) when a plot is asked for and matplotlib is missing."""
    if not has_matplotlib():
        raise BnmoveError(
            "--plot needs matplotlib: pip install matplotlib (or the bnmove[plot] extra)"
        ) from None


def comparison_plot(comparison: Comparison, path: Path) -> None:
    """Latency vs batch size per variant (needs matplotlib: ``pip install bnmove[plot]``)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if comparison.accuracies else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax_lat, ax_thr = axes[0], axes[1]
    deviating = {d.variant for d in comparison.deviations if d.deviates}
    for info in comparison.variants:
        label = f"{info.name} ({DEVIATES} outputs)" if info.name in deviating else info.name
        timings = sorted(
            (t for t in comparison.timings if t.variant == info.name), key=lambda t: t.batch_size
        )
        sizes = [t.batch_size for t in timings]
        ax_lat.plot(sizes, [t.p50_ms for t in timings], marker="o", label=label)
        ax_lat.fill_between(sizes, [t.p50_ms for t in timings], [t.p90_ms for t in timings], alpha=0.15)
        ax_thr.plot(sizes, [t.throughput for t in timings], marker="o", label=label)
    sizes = sorted({t.batch_size for t in comparison.timings})
    for ax, label in ((ax_lat, "latency p50 (ms), band to p90"), (ax_thr, "throughput (samples/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    if comparison.accuracies:
        ax_acc = axes[2]
        accs = comparison.accuracies
        values = [100 * a.accuracy for a in accs]
        errors = [[100 * (a.accuracy - a.low) for a in accs], [100 * (a.high - a.accuracy) for a in accs]]
        ax_acc.bar([a.variant for a in accs], values, yerr=errors, capsize=4, color="tab:gray")
        ax_acc.set_ylim(max(0.0, min(100 * a.low for a in accs) - 5), 100)
        ax_acc.set_ylabel(f"top-1 accuracy (%), 95% CI, {accs[0].samples:,} samples")
        ax_acc.grid(True, axis="y", alpha=0.3)
    fig.suptitle(
        f"{comparison.provider.upper()} · {comparison.device} · onnxruntime {comparison.onnxruntime}",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# -- export (bnmove export) ------------------------------------------------------------------


def int8_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per INT8 variant: its agreement with the float variant and what stays in float."""
    lines = []
    for name, entry in manifest.get("variants", {}).items():
        int8 = entry.get("int8")
        if not int8:
            continue
        agreement = int8["top1_agreement_with_float"]
        ops = Counter(n["op"] for n in int8["float_nodes"])
        left = ", ".join(f"{op}×{count}" for op, count in ops.most_common()) or "none"
        lines.append(
            f"{name}.int8: {int8['file']}; against {name} on {int8['held_out_samples']} held-out "
            f"calibration samples: top-1 agreement {'—' if agreement is None else f'{agreement:.1%}'}, "
            f"max relative error {int8['max_rel_error_vs_float']:.2%}; float nodes: {left}"
        )
    return lines


def export_table(manifest: dict[str, Any]) -> Table:
    table = Table(title="Exported variants", title_justify="left")
    for column in (
        "variant",
        "file",
        "moves (exact/fit/swap)",
        "BN nodes",
        "standalone BNs",
        "ORT vs torch",
        "size",
    ):
        table.add_column(column, justify="left" if column in ("variant", "file") else "right")
    for name, v in manifest.get("variants", {}).items():
        standalone = v.get("standalone_bns")
        table.add_row(
            name,
            v["file"],
            f"{v['moved']} ({v['moved_exact']}/{v.get('moved_fit', 0)}/{v['moved_swap']})",
            str(v["batchnorm_nodes"]),
            "—" if standalone is None else str(len(standalone)),
            f"{v['onnxruntime_vs_torch_max_abs_error']:.1e}",
            f"{v['file_size'] / 1e6:.2f} MB",
        )
    return table


# -- experiment (bnmove experiment) ------------------------------------------------------


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
    """One row per placement; below :data:`WIDE_TABLE` columns a compact form that fits 80."""
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
    """The verdicts, then what the user should know about the study (chance level, notes)."""
    lines = [d.verdict() for d in result.differences()]
    warning = result.at_chance()
    return lines + ([f"note: {warning}"] if warning else [])


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

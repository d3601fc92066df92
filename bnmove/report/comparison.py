"""Comparisons (bnmove compare) and exports (bnmove export)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from ..core.atomic import atomic_path
from ..deploy.accuracy import Accuracy
from ..deploy.comparison import Comparison, OutputDeviation, VariantInfo
from ..deploy.sessions import int8_execution
from ..study.stats import ACCURACY
from ._shared import require_matplotlib


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
                "ratio_low": t.ratio_low,
                "ratio_high": t.ratio_high,
                "max_abs": dev.max_abs if dev else None,
                "mean_abs": dev.mean_abs if dev else None,
                "cosine": dev.cosine if dev else None,
                "top1": dev.top1_agreement if dev else None,
                "deviates": bool(dev and dev.deviates),
                "nodes": sum(info.optimized_nodes.values()),
                "batchnorms": info.batchnorms,
                "file_size": info.file_size,
                "precision": info.precision,
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
#: marks an INT8 variant the provider runs in float (QDQ on CUDA)
EMULATED = "†"


def _variant_label(row: dict[str, Any]) -> str:
    label = str(row["variant"])
    if row.get("precision") == int8_execution("cuda"):
        label += EMULATED
    return f"{label} {DEVIATES}" if row["deviates"] else label


def provider_lines(comparison: Comparison) -> list[str]:
    """How the timings ran and how outputs were checked; which INT8 variants ran in float."""
    lines = []
    if comparison.timed_with:
        lines.append(
            f"timed with {comparison.timed_with}; outputs, nodes and accuracy checked with "
            f"{comparison.checked_with}"
        )
    if comparison.threads:
        per_batch = "; ".join(f"batch {b}: {c.describe()}" for b, c in comparison.threads.items())
        lines.append(f"onnxruntime CPU threads for the timings: {per_batch}")
    emulated = [v.name for v in comparison.variants if v.precision == int8_execution("cuda")]
    if emulated:
        lines.append(
            f"{EMULATED} {', '.join(emulated)}: int8 emulated in float. onnxruntime's CUDA provider has "
            "no int8 convolution and runs DequantizeLinear → float Conv → QuantizeLinear, so these are "
            "not int8 timings; time INT8 on --provider tensorrt (--quantize int8-tensorrt) or cpu"
        )
    return lines


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


def noise_lines(comparison: Comparison) -> list[str]:
    """Per batch size: each ratio's 95% interval over the rounds, the noise floor (the reference's own
    file in a second session, timed in the same rounds), and a warning where the floor is as wide
    as every difference measured."""
    lines = []
    for batch, floor in comparison.noise_floor.items():
        timed = [t for t in comparison.timings if t.batch_size == batch and t.variant != comparison.reference]
        runs = next((t.runs for t in comparison.timings if t.batch_size == batch), 0)
        intervals = ", ".join(f"{t.variant} {t.ratio_low:.2f}–{t.ratio_high:.2f}×" for t in timed)
        lines.append(
            f"batch {batch}, 95% intervals over {runs} rounds: {intervals}; noise floor (the "
            f"'{comparison.reference}' file timed again in the same rounds) {floor.ratio:.2f}× "
            f"({floor.low:.2f}–{floor.high:.2f}×)"
        )
        if comparison.too_noisy(batch):
            lines.append(
                f"the machine is too noisy to separate these variants at batch {batch}: one graph timed "
                f"twice read {floor.low:.2f}–{floor.high:.2f}× of itself, as far from 1 as any variant; "
                "time for longer (--seconds) or on a quieter machine"
            )
    return lines


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
    lines += ["", *provider_lines(comparison)]
    noise = noise_lines(comparison)
    if noise:
        lines += ["", *noise]
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


#: export's columns that a narrow terminal drops, in this order (the file names follow a pattern
#: the title then states)
_EXPORT_DROP_ORDER = ("file", "size", "ORT vs torch")


def export_table(manifest: dict[str, Any], width: int | None = None) -> Table:
    """The variants an export wrote; at ``width`` columns (a terminal's) it drops the file names
    (stated as a pattern in the title), the sizes and the ONNX-vs-torch errors, in that order, so
    the rest stay readable."""
    variants = manifest.get("variants", {})
    auto = manifest.get("fold") == "auto"
    cells: dict[str, Callable[[str, dict[str, Any]], str]] = {
        "variant": lambda n, v: n,
        "file": lambda n, v: str(v["file"]),
        "moves (e/f/s)": lambda n, v: (
            f"{v['moved']} ({v['moved_exact']}/{v.get('moved_fit', 0)}/{v['moved_swap']})"
        ),
        **({"fold kept": lambda n, v: str(v.get("fold_auto", {}).get("form", ""))} if auto else {}),
        "BN nodes": lambda n, v: str(v["batchnorm_nodes"]),
        "standalone BNs": lambda n, v: (
            "—" if v.get("standalone_bns") is None else str(len(v["standalone_bns"]))
        ),
        "ORT vs torch": lambda n, v: f"{v['onnxruntime_vs_torch_max_abs_error']:.1e}",
        "size": lambda n, v: f"{v['file_size'] / 1e6:.2f} MB",
    }
    rows = {n: {c: render(n, v) for c, render in cells.items()} for n, v in variants.items()}
    columns = list(cells)

    def needed(column: str) -> int:  # its widest cell or header word, with its border and padding
        return max([len(w) for w in column.split()] + [len(r[column]) for r in rows.values()]) + 3

    for dropped in _EXPORT_DROP_ORDER:
        if width is None or sum(needed(c) for c in columns) + 1 <= width:
            break
        columns.remove(dropped)
    title = "Exported variants; moves: all (exact/fit/swap)"
    if "file" not in columns and variants:
        stem = str(next(iter(variants.values()))["file"]).rsplit(".", 2)[0]
        title += f" (files: {stem}.<variant>.onnx)"
    table = Table(title=title, title_justify="left")
    for column in columns:  # fixed widths: headers wrap at their words, cells are never cut
        left = column in ("variant", "file")
        table.add_column(column, justify="left" if left else "right", width=needed(column) - 3)
    for row in rows.values():
        table.add_row(*(row[c] for c in columns))
    return table

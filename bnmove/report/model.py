"""Pairs (bnmove inspect) and conversions (bnmove convert)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.table import Table

from ..analysis.detect import Pair
from ..analysis.tracing import Untraced
from ..deploy.folding import BnFate
from ..pipeline.results import Conversion, Move
from ..rules import MOVE_IDENTITY
from ..rules.base import Method
from ._shared import WIDE_TABLE, _yes


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
    """One row per BN; below `WIDE_TABLE` columns the compact form (see `conversion_table`),
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


#: each method in a sentence, and in a table's short column
_METHOD_LABEL = {
    Method.EXACT: ("folded exactly", "exact"),
    Method.EXACT_KEPT_AFFINE: ("exact with kept affine", "exact+affine"),
    Method.FIT_DATA_FREE: ("fitted to Gaussian statistics", "fit (Gaussian)"),
    Method.FIT_CALIBRATED: ("fitted on data", "fit (data)"),
    Method.FIT_SYNTHETIC: ("fitted on synthetic inputs", "fit (synthetic)"),
    Method.SWAP: ("swapped", "swap"),
}


#: an exact move that folded nothing and kept nothing: the BN computed nothing in eval mode
_IDENTITY_LABEL = ("moved as the identity", "exact (identity)")


def _label(method: Method | None, short: bool = False, rule: str | None = None) -> str:
    if rule == MOVE_IDENTITY.name:
        return _IDENTITY_LABEL[int(short)]
    return _METHOD_LABEL[method or Method.EXACT][int(short)]


def _move_result(move: Move, short: bool) -> str:
    method = move.method or Method.EXACT
    if move.absorbed is not None:  # stays, and its BN took in a kept affine by fitting
        return f"[cyan]{'absorbed' if short else 'stays, affine absorbed'} ({_label(method, short)})[/]"
    if not move.moved:
        return "stays"
    if move.keeps_outputs:
        colour = "green"
    elif method.fitted:
        colour = "cyan"
    else:
        colour = "yellow"
    if short:
        return f"[{colour}]{_label(method, True, move.rule)}[/]"
    text = "swap: function changed" if method is Method.SWAP else _label(method, rule=move.rule)
    return f"[{colour}]moved ({text})[/]"


def conversion_table(conversion: Conversion, width: int | None = None) -> Table:
    """One row per BN. At ``width`` columns below `WIDE_TABLE` (a terminal's) the
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
    counts = Counter(_label(m.method, rule=m.rule) for m in moved)
    adjacent = sum(m.pair.placement is not None for m in conversion.moves)
    detail = ", ".join(f"{n} {label}" for label, n in counts.items()) or "none"
    absorbed = conversion.absorbed
    if absorbed:
        how = Counter(_label(m.method) for m in absorbed)
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
        if any(m.method is Method.SWAP for m in moved):
            text += " (swaps change the function: retrain or fine-tune)"
        elif any(m.method is not None and m.method.fitted for m in [*moved, *absorbed]):
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


#: how each fate reads in ``inspect --deploy``
_FATE_LABEL = {
    "folded-forward": "[green]folded forward[/]",
    "fused-backward": "[green]fused backward[/]",
    "identity": "[green]removed (identity)[/]",
    "standalone": "[yellow]stays a BN[/]",
}


def deploy_table(bns: Sequence[BnFate], title: str, width: int | None = None) -> Table:
    """One row per BN (and kept affine): what an export with these folds does with it, and into
    which layer or why not: the decision ``export`` carries out and its manifest records."""
    compact = width is not None and width < WIDE_TABLE
    table = Table(title=title, title_justify="left", expand=compact, width=width if compact else None)
    table.add_column("BN", overflow="fold", ratio=3, min_width=12)
    table.add_column("in the deployed graph", no_wrap=True)
    table.add_column("into / why not", overflow="fold", ratio=5, min_width=18)
    for fate in bns:
        where = fate.into or fate.reason or ""
        if fate.scale_into:
            where += f" (its scale into {fate.scale_into})"
        table.add_row(fate.bn, _FATE_LABEL[fate.fate.value], where)
    return table


def deploy_summary(bns: Sequence[BnFate]) -> str:
    counts = Counter(fate.fate.value for fate in bns)
    parts = [f"{counts[key]} {text}" for key, text in (
        ("fused-backward", "fused backward by the exporter"),
        ("folded-forward", "folded forward"),
        ("identity", "removed as identities"),
        ("standalone", "left as BNs of their own"),
    ) if counts[key]]  # fmt: skip
    return f"{len(bns)} BatchNorms (and kept affines): " + (", ".join(parts) if parts else "none")

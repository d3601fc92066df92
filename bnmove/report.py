"""Rendering only: rich tables and summary lines for pairs and conversions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.table import Table

from .conversion import Conversion
from .detect import Pair
from .tracing import Untraced


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def pairs_table(pairs: Sequence[Pair]) -> Table:
    table = Table(title="BatchNorm–activation pairs", title_justify="left")
    for column in ("BN", "activation", "kind", "placement", "movable", "exact", "reason"):
        table.add_column(column, overflow="fold")
    for pair in pairs:
        table.add_row(
            pair.bn + (" (fused)" if pair.fused else ""),
            pair.activation or "—",
            pair.activation_kind or "—",
            pair.placement or "not adjacent",
            _yes(pair.movable),
            _yes(pair.exact),
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
    parts = [
        f"{adjacent} pairs ({placed['before']} BN before activation, {placed['after']} after)",
        f"{movable} movable",
        f"{exact} exactly",
    ]
    if lone:
        parts.append(f"{lone} BatchNorm not adjacent to an activation")
    return ", ".join(parts)


def untraced_lines(untraced: Sequence[Untraced]) -> list[str]:
    return [
        f"not traced: {u.name} ({u.type_name}): {u.reason}; pairs inside its own forward are not seen"
        for u in untraced
    ]


def conversion_table(conversion: Conversion) -> Table:
    table = Table(title=f"Moves to placement '{conversion.placement}'", title_justify="left")
    for column in ("BN", "activation", "kind", "was", "result", "note"):
        table.add_column(column, overflow="fold")
    for move in conversion.moves:
        pair = move.pair
        if move.moved and move.method == "exact":
            result = "[green]moved (exact)[/]"
        elif move.moved:
            result = "[yellow]moved (swap: function changed)[/]"
        else:
            result = "stays"
        note = "; ".join(filter(None, [move.reason, *move.notes]))
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
    exact = sum(m.method == "exact" for m in moved)
    adjacent = sum(m.pair.placement is not None for m in conversion.moves)
    text = (
        f"moved {len(moved)} of {adjacent} BN–activation pairs ({exact} exact, {len(moved) - exact} swapped)"
    )
    dev = conversion.verification
    if dev is not None:
        shapes = ", ".join("x".join(map(str, s)) for s in dev.input_shapes)
        text += (
            f"; eval outputs on {shapes}: max abs error {dev.max_abs_error:.3g}, "
            f"relative {dev.max_rel_error:.3g}"
        )
        if conversion.changed_function:
            text += " (swaps change the function: retrain or fine-tune)"
    return text

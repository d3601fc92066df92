"""Rendering only: tables, summaries, Markdown, CSV, JSON and plots of bnmove's results."""

from ._shared import WIDE_TABLE, has_matplotlib, require_matplotlib
from .comparison import (
    DEVIATES,
    accuracy_cells,
    accuracy_table,
    comparison_csv,
    comparison_header,
    comparison_json,
    comparison_markdown,
    comparison_ops_lines,
    comparison_plot,
    comparison_table,
    deviation_note,
    export_table,
    int8_lines,
)
from .experiment import (
    experiment_header,
    experiment_json,
    experiment_lines,
    experiment_markdown,
    experiment_plot,
    experiment_table,
    write_experiment,
)
from .model import conversion_summary, conversion_table, pairs_summary, pairs_table, untraced_lines

__all__ = [
    "DEVIATES",
    "WIDE_TABLE",
    "accuracy_cells",
    "accuracy_table",
    "comparison_csv",
    "comparison_header",
    "comparison_json",
    "comparison_markdown",
    "comparison_ops_lines",
    "comparison_plot",
    "comparison_table",
    "conversion_summary",
    "conversion_table",
    "deviation_note",
    "experiment_header",
    "experiment_json",
    "experiment_lines",
    "experiment_markdown",
    "experiment_plot",
    "experiment_table",
    "export_table",
    "has_matplotlib",
    "int8_lines",
    "pairs_summary",
    "pairs_table",
    "require_matplotlib",
    "untraced_lines",
    "write_experiment",
]

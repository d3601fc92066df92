"""Deployment: ONNX export of the variants, forward folding, INT8, onnxruntime comparison."""

from .comparison import Comparison
from .export import Export, ExportOptions, export_variants
from .folding import Folding, fold_forward
from .providers import select_provider
from .runtime import compare

__all__ = [
    "Comparison",
    "Export",
    "ExportOptions",
    "Folding",
    "compare",
    "export_variants",
    "fold_forward",
    "select_provider",
]

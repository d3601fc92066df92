"""Export placement variants to ONNX, check each one, and write a manifest.

Each variant (``original``, ``before``, ``after``) is exported with the
torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``), passes
``onnx.checker``, and must give onnxruntime outputs that match PyTorch's for the
same variant; the error goes in ``manifest.json``. Files land in the output
folder only once every variant succeeded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.atomic import check_output_folder
from ..core.clone import clone_module
from ..core.progress import OnProgress, Stage
from ..errors import BnmoveError
from ..fitting.calibrate import calibration_batches
from ..pipeline.calibration import Calibration
from ..pipeline.conversion import convert
from .cheapest import cheapest_form
from .folding import fold_forward
from .onnx_file import DEFAULT_OPSET, check_against_torch, export_onnx, sha256_of, value_shape
from .providers import import_onnxruntime
from .quantize import QuantizationSamples, check_quantization, quantize_variant

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("original", "before", "after")
MANIFEST = "manifest.json"


def _variant_model(
    model: nn.Module, variant: str, inputs: Sequence[torch.Tensor], conversion: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    if variant == "original":
        return clone_module(model), {
            "moves": [],
            "moved": 0,
            "moved_exact": 0,
            "moved_fit": 0,
            "moved_swap": 0,
        }
    try:
        result = convert(model, variant, example_inputs=inputs, **conversion)
    except BnmoveError as exc:
        raise BnmoveError(f"{variant}: {exc}") from exc
    info = result.to_dict()
    return result.model, {
        "moves": [
            {"bn": m["pair"]["bn"], "activation": m["pair"]["activation"], "method": m["method"]}
            for m in info["moves"]
            if m["moved"]
        ],
        "moved": info["moved"],
        "moved_exact": info["moved_exact"],
        "moved_fit": info["moved_fit"],
        "moved_swap": info["moved_swap"],
        "conversion_verification": info["verification"],
        "conversion_held_out": info["held_out"],
        "conversion_warnings": list(result.warnings),
    }


def require_export_tools() -> None:
    """Fail before any work when something an export needs is missing: onnx, onnxscript (torch's
    ONNX exporter) and onnxruntime (every file is checked with it)."""
    for module in ("onnx", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            raise BnmoveError(f"{module} is not installed, and export needs it: pip install {module}")
    import_onnxruntime()


@dataclass(frozen=True)
class ExportOptions:
    """How each variant is exported (``export_variants(..., options=ExportOptions(fold="padded"))``).

    Args:
        fold: ``"none"``; ``"forward"``: fold BNs that follow their activation into the next
            layers where exact ([`bnmove.deploy.fold_forward`][bnmove.deploy.fold_forward]); ``"padded"``: also into
            zero-padded convs, with a border correction (see `bnmove.deploy.border`);
            ``"auto"``: each of these forms exported and timed on onnxruntime's CPU provider, the
            fastest kept per variant, with the figures in the manifest (`bnmove.deploy.cheapest`).
        quantize: ``"int8"`` also writes ``<stem>.<variant>.int8.onnx`` beside each float
            variant: onnxruntime's static quantization (QDQ, per-channel int8 weights), calibrated
            on the calibration data (required) with its last samples held out to measure the
            agreement with the float variant (see `bnmove.deploy.quantize`); uint8
            activations, the fast form on onnxruntime's CPU provider. ``"int8-tensorrt"``: signed,
            symmetric int8 activations, the only int8 TensorRT builds.
        opset: ONNX opset.
        static_batch: fix the batch dimension (dynamic by default).
        tolerance: allowed onnxruntime-vs-PyTorch error, relative to the largest output.
    """

    fold: str = "none"
    quantize: str | None = None
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.fold not in FOLDS:
            raise BnmoveError(f"unknown fold {self.fold!r}; choose one of: {', '.join(FOLDS)}")


#: the forms of folding an export may apply (``auto``: each measured, the fastest kept)
FOLDS = ("none", "forward", "padded", "auto")


def export_variants(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    out_dir: str | Path,
    placements: Sequence[str] = VARIANTS,
    *,
    method: str = "auto",
    calibration: Calibration | None = None,
    options: ExportOptions | None = None,
    stem: str = "model",
    force: bool = False,
    max_error: float | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Path]:
    """Export each placement variant of ``model`` to ``out_dir/<stem>.<variant>.onnx``.

    Args:
        model: the model; it is not modified.
        example_inputs: inputs for export and for checking onnxruntime against PyTorch.
        out_dir: created if missing; existing variant files need ``force``.
        placements: any of ``"original"``, ``"before"``, ``"after"``.
        method: conversion method for the moved variants (see [`bnmove.convert`][bnmove.convert]).
        calibration: where fitted moves get their samples, as for [`bnmove.convert`][bnmove.convert]; with
            data, every moved variant fits on the same samples and the held-out figures go into
            the manifest (INT8 variants are calibrated on it too).
        options: folds, quantization, opset, batch and tolerance ([`ExportOptions`][bnmove.ExportOptions]).
        max_error: the bound on a fitted variant's relative error, as for [`bnmove.convert`][bnmove.convert].
        on_progress: given a [`Stage`][bnmove.Stage] before each variant is exported
            ("exporting after", variants done, variants in all).

    Returns:
        ``{variant: path}`` (with ``quantize``, also ``{"<variant>.int8": path}``);
        ``out_dir/manifest.json`` describes every file.
    """
    unknown = [p for p in placements if p not in VARIANTS]
    if unknown or not placements:
        raise BnmoveError(
            f"unknown variant {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}"
        )
    require_export_tools()
    calibration = calibration or Calibration()
    options = options or ExportOptions()
    quantize = options.quantize
    check_quantization(quantize, calibration.data is not None)
    out = Path(out_dir)
    check_output_folder(out)
    targets = {v: out / f"{stem}.{v}.onnx" for v in placements}
    int8_targets = {v: out / f"{stem}.{v}.int8.onnx" for v in placements} if quantize else {}
    clash = [p for p in (*targets.values(), *int8_targets.values(), out / MANIFEST) if p.exists()]
    if clash and not force:
        raise BnmoveError(f"{clash[0]}: already exists; pass --force to overwrite")
    inputs = tuple(example_inputs)
    if calibration.data is not None:  # read once; every moved variant fits on the same samples
        calibration = replace(
            calibration, data=calibration_batches(calibration.data, samples=calibration.samples)
        )
    quantization = QuantizationSamples.split(calibration.data, quantize) if quantize else None
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        return _export_into(
            model,
            inputs,
            out,
            targets,
            placements,
            {
                "method": method,
                "calibration": calibration,
                "max_error": max_error,
            },
            options.opset,
            options.static_batch,
            None if options.fold == "none" else options.fold,
            options.tolerance,
            on_progress,
            quantization,
        )
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves nothing behind
        raise


def _export_into(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    targets: dict[str, Path],
    placements: Sequence[str],
    conversion: dict[str, Any],
    opset: int,
    static_batch: bool,
    folding_mode: str | None,
    tolerance: float,
    on_progress: OnProgress | None,
    quantization: QuantizationSamples | None = None,
) -> dict[str, Path]:
    import onnx

    entries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=".bnmove-export-", dir=out) as tmp:
        staged: dict[str, Path] = {}
        for variant in placements:
            if on_progress is not None:
                on_progress(Stage(f"exporting {variant}", len(entries), len(placements)))
            variant_model, entry = _variant_model(model, variant, inputs, conversion)
            path = Path(tmp) / targets[variant].name
            write = _Writer(inputs, opset, static_batch, tolerance, variant)
            if folding_mode == "auto":
                quantize = (
                    (lambda f, o: quantize_variant(f, o, quantization, Path(tmp))) if quantization else None
                )
                err, chosen = cheapest_form(variant_model, path, write, quantize)
                entry.update(chosen)
            else:
                if folding_mode is not None:
                    folding = fold_forward(variant_model, padded=folding_mode == "padded")
                    variant_model = folding.model
                    entry.update(folding.manifest())
                err = write(variant_model, path)
            proto = onnx.load(str(path), load_external_data=False)
            entry.update(
                file=targets[variant].name,
                opset=opset,
                inputs=[{"name": i.name, "shape": value_shape(i)} for i in proto.graph.input],
                outputs=[{"name": o.name, "shape": value_shape(o)} for o in proto.graph.output],
                batch="static" if static_batch else "dynamic",
                file_size=path.stat().st_size,
                sha256=sha256_of(path),
                onnxruntime_vs_torch_max_abs_error=err,
                batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
            )
            if quantization is not None:
                int8_path = path.with_name(targets[variant].name[: -len(".onnx")] + ".int8.onnx")
                entry["int8"] = quantize_variant(path, int8_path, quantization, Path(tmp))
                staged[f"{variant}.int8"] = int8_path
            entries[variant] = entry
            staged[variant] = path
        manifest = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "method": conversion["method"],
            "calibration": "data" if conversion["calibration"].data is not None else "none",
            **(
                {
                    "quantization": {
                        "type": quantization.kind,
                        "calibration_samples": quantization.samples()[0],
                        "held_out_samples": quantization.samples()[1],
                    }
                }
                if quantization is not None
                else {}
            ),
            "fold": folding_mode or "none",
            "fold_forward": folding_mode is not None,
            "fold_padded": folding_mode == "padded",
            **(
                {
                    "border_correction": "each border-corrected conv adds a constant made for the exported "
                    "spatial size (fixed in the file); export again for another size"
                }
                if folding_mode in ("padded", "auto")
                else {}
            ),
            "example_input_shapes": [list(x.shape) for x in inputs],
            "variants": entries,
        }
        manifest_tmp = Path(tmp) / MANIFEST
        manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        for path in staged.values():
            os.replace(path, out / path.name)
        os.replace(manifest_tmp, out / MANIFEST)
    return {name: out / path.name for name, path in staged.items()}


@dataclass(frozen=True)
class _Writer:
    """Export one model to ONNX and check onnxruntime against PyTorch; returns the max abs error."""

    inputs: tuple[torch.Tensor, ...]
    opset: int
    static_batch: bool
    tolerance: float
    variant: str

    def __call__(self, model: nn.Module, path: Path) -> float:
        export_onnx(model, self.inputs, path, opset=self.opset, dynamic_batch=not self.static_batch)
        err, scale = check_against_torch(model, self.inputs, path)
        if err > self.tolerance * max(scale, 1.0):
            raise BnmoveError(
                f"{self.variant}: onnxruntime output differs from PyTorch by {err:.3g} "
                f"(tolerance {self.tolerance:g} x {max(scale, 1.0):.3g})"
            )
        return err


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data

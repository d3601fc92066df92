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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

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
    model: nn.Module, variant: str, inputs: Sequence[torch.Tensor], conversion: _VariantConversion
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
        result = convert(
            model,
            variant,
            method=conversion.method,
            example_inputs=inputs,
            calibration=conversion.calibration,
            max_error=conversion.max_error,
        )
    except BnmoveError as exc:
        raise BnmoveError(f"{variant}: {exc}") from exc
    info = result.to_dict()
    return result.model, {
        "moves": [
            {"bn": m.pair.bn, "activation": m.pair.activation, "method": m.method} for m in result.moved
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


#: how an export folds BNs: not at all, forward into the next layer, also into padded convs
#: (with a border correction), or each form measured and the fastest kept
FoldForm = Literal["none", "forward", "padded", "auto"]


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

    fold: FoldForm = "none"
    quantize: str | None = None
    opset: int = DEFAULT_OPSET
    static_batch: bool = False
    tolerance: float = 1e-4

    def __post_init__(self) -> None:
        if self.fold not in FOLDS:
            raise BnmoveError(f"unknown fold {self.fold!r}; choose one of: {', '.join(FOLDS)}")


#: the forms of folding an export may apply (``auto``: each measured, the fastest kept)
FOLDS: tuple[FoldForm, ...] = get_args(FoldForm)


@dataclass(frozen=True)
class Export(Mapping[str, Path]):
    """What [`export_variants`][bnmove.export_variants] wrote: each file by name (``"after"``,
    ``"after.int8"``; it reads like the ``{name: path}`` dict earlier versions returned), and the
    manifest that ``folder/manifest.json`` holds (every variant's moves, folds, checks and sizes)."""

    folder: Path
    files: dict[str, Path]
    manifest: dict[str, Any]

    def __getitem__(self, name: str) -> Path:
        return self.files[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def variants(self) -> dict[str, dict[str, Any]]:
        """Each variant's manifest entry."""
        return dict(self.manifest["variants"])

    def warnings(self) -> list[str]:
        """``variant: warning`` for what the conversions warned of (a forward that needs bnmove)."""
        return [
            f"{name}: {w}"
            for name, entry in self.variants.items()
            for w in entry.get("conversion_warnings", [])
        ]

    def notes(self) -> list[str]:
        """``variant: note`` where ``--fold-auto`` could not tell the forms apart on this machine."""
        return [
            f"{name}: --fold-auto kept {auto['form']}: {auto['reason']}"
            for name, entry in self.variants.items()
            if (auto := entry.get("fold_auto", {})).get("too_noisy")
        ]


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
) -> Export:
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
        An [`Export`][bnmove.deploy.Export]: ``{variant: path}`` (with ``quantize``, also
        ``{"<variant>.int8": path}``) and the manifest, which ``out_dir/manifest.json`` holds.
    """
    unknown = [p for p in placements if p not in VARIANTS]
    if unknown or not placements:
        raise BnmoveError(
            f"unknown variant {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}"
        )
    require_export_tools()
    calibration = calibration or Calibration()
    options = options or ExportOptions()
    check_quantization(options.quantize, calibration.data is not None)
    out = Path(out_dir)
    targets = _targets(out, stem, placements, options.quantize is not None, force)
    if calibration.data is not None:  # read once; every moved variant fits on the same samples
        calibration = replace(
            calibration, data=calibration_batches(calibration.data, samples=calibration.samples)
        )
    job = _ExportJob(
        model=model,
        inputs=tuple(example_inputs),
        out=out,
        targets=targets,
        conversion=_VariantConversion(method, calibration, max_error),
        options=options,
        quantization=QuantizationSamples.split(calibration.data, options.quantize)
        if options.quantize
        else None,
    )
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        return job.run(on_progress)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves nothing behind
        raise


def _targets(out: Path, stem: str, placements: Sequence[str], int8: bool, force: bool) -> dict[str, Path]:
    """Each variant's file; one clear error where it, its INT8 twin or the manifest exists
    (unless ``force``)."""
    check_output_folder(out)
    targets = {v: out / f"{stem}.{v}.onnx" for v in placements}
    int8_targets = [out / f"{stem}.{v}.int8.onnx" for v in placements] if int8 else []
    clash = [p for p in (*targets.values(), *int8_targets, out / MANIFEST) if p.exists()]
    if clash and not force:
        raise BnmoveError(f"{clash[0]}: already exists; pass --force to overwrite")
    return targets


@dataclass(frozen=True)
class _VariantConversion:
    """How the moved variants are made (as `bnmove.convert` takes it)."""

    method: str
    calibration: Calibration
    max_error: float | None


@dataclass(frozen=True)
class _ExportJob:
    """One export: every variant written to a staging folder and checked, then moved in with the
    manifest (all or nothing)."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    out: Path
    targets: dict[str, Path]
    conversion: _VariantConversion
    options: ExportOptions
    quantization: QuantizationSamples | None

    @property
    def fold(self) -> str | None:
        return None if self.options.fold == "none" else self.options.fold

    def run(self, on_progress: OnProgress | None) -> Export:
        entries: dict[str, Any] = {}
        staged: dict[str, Path] = {}
        with tempfile.TemporaryDirectory(prefix=".bnmove-export-", dir=self.out) as tmp:
            for variant in self.targets:
                if on_progress is not None:
                    on_progress(Stage(f"exporting {variant}", len(entries), len(self.targets)))
                entries[variant], files = self._variant(variant, Path(tmp))
                staged.update(files)
            manifest = self._manifest(entries)
            manifest_tmp = Path(tmp) / MANIFEST
            manifest_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
            for path in staged.values():
                os.replace(path, self.out / path.name)
            os.replace(manifest_tmp, self.out / MANIFEST)
        return Export(self.out, {name: self.out / path.name for name, path in staged.items()}, manifest)

    def _variant(self, variant: str, tmp: Path) -> tuple[dict[str, Any], dict[str, Path]]:
        """Write one variant (and its INT8 twin) into ``tmp``: its manifest entry and its files."""
        import onnx

        variant_model, entry = _variant_model(self.model, variant, self.inputs, self.conversion)
        path = tmp / self.targets[variant].name
        options = self.options
        write = _Writer(self.inputs, options.opset, options.static_batch, options.tolerance, variant)
        if self.fold == "auto":
            samples = self.quantization
            quantize = (lambda f, o: quantize_variant(f, o, samples, tmp)) if samples else None
            err, chosen = cheapest_form(variant_model, path, write, quantize)
            entry.update(chosen)
        else:
            if self.fold is not None:
                folding = fold_forward(variant_model, padded=self.fold == "padded")
                variant_model = folding.model
                entry.update(folding.manifest())
            err = write(variant_model, path)
        proto = onnx.load(str(path), load_external_data=False)
        entry.update(
            file=path.name,
            opset=options.opset,
            inputs=[{"name": i.name, "shape": value_shape(i)} for i in proto.graph.input],
            outputs=[{"name": o.name, "shape": value_shape(o)} for o in proto.graph.output],
            batch="static" if options.static_batch else "dynamic",
            file_size=path.stat().st_size,
            sha256=sha256_of(path),
            onnxruntime_vs_torch_max_abs_error=err,
            batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
        )
        files = {variant: path}
        if self.quantization is not None:
            int8_path = path.with_name(path.name[: -len(".onnx")] + ".int8.onnx")
            entry["int8"] = quantize_variant(path, int8_path, self.quantization, tmp)
            files[f"{variant}.int8"] = int8_path
        return entry, files

    def _manifest(self, entries: dict[str, Any]) -> dict[str, Any]:
        import onnx

        fold, quantization = self.fold, self.quantization
        manifest: dict[str, Any] = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "method": self.conversion.method,
            "calibration": "data" if self.conversion.calibration.data is not None else "none",
        }
        if quantization is not None:
            calibration_samples, held_out = quantization.samples()
            manifest["quantization"] = {
                "type": quantization.kind,
                "calibration_samples": calibration_samples,
                "held_out_samples": held_out,
            }
        manifest.update(fold=fold or "none", fold_forward=fold is not None, fold_padded=fold == "padded")
        if fold in ("padded", "auto"):
            manifest["border_correction"] = (
                "each border-corrected conv adds a constant made for the exported spatial size (fixed "
                "in the file); export again for another size"
            )
        manifest["example_input_shapes"] = [list(x.shape) for x in self.inputs]
        manifest["variants"] = entries
        return manifest


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

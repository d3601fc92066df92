"""INT8 variants: onnxruntime's static quantization of each exported float variant.

Each float variant (after bnmove's folds) goes through onnxruntime's recommended pre-processing
(``quant_pre_process``: symbolic shape inference and graph optimisation) and ``quantize_static``
in the QDQ format with per-channel int8 weights and uint8 activations (U8S8), MinMax-calibrated
on the same samples for every variant. uint8 activations because onnxruntime's CPU provider fuses
every QDQ conv into ``QLinearConv`` with them: with int8 activations it ran 54 of
EfficientNet-B0's 81 convs as float ``Conv`` between dequantize and quantize (2026-12-02,
onnxruntime 1.32, x86-64), 2–4× slower, and which convs it kept in float differed between two
placements of the same model, so INT8 comparisons measured that instead of the placement. The last calibration samples (`split_held_out`) stay out
of the calibration: agreement of the INT8 variant with its float variant is measured on them.

onnxruntime has no int8 BatchNormalization: a BN that no exact rule folded stays a float op
between a dequantize and a quantize, which is what makes an after-placement model cost more
once quantized. The report lists every node left in float, with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.fidelity import Agreement
from ..errors import BnmoveError
from ..fitting.calibrate import Batch, split_held_out

#: what --quantize accepts, and how each quantizes activations: (onnxruntime's type, symmetric, what
#: the manifest says). "int8" is for onnxruntime's CPU provider (uint8 activations: fused into
#: QLinearConv); "int8-tensorrt" is the only int8 TensorRT builds (signed, symmetric activations).
_FORMS = {
    "int8": (
        "QUInt8",
        False,
        "QDQ, uint8 activations, per-channel int8 weights (onnxruntime quantize_static, MinMax)",
    ),
    "int8-tensorrt": (
        "QInt8",
        True,
        "QDQ, signed symmetric int8 activations, per-channel symmetric int8 weights, the form "
        "TensorRT builds (onnxruntime quantize_static, MinMax)",
    ),
}
QUANTIZATIONS = tuple(_FORMS)
_QDQ = {"QuantizeLinear", "DequantizeLinear"}


def check_quantization(quantize: str | None, calibration_given: bool) -> None:
    """Fail before any work when ``quantize`` cannot be done: an unknown kind, onnxruntime's
    quantization tools missing, or no calibration data to calibrate the int8 ranges on."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise BnmoveError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
    if (
        importlib.util.find_spec("onnxruntime") is None
        or importlib.util.find_spec("onnxruntime.quantization") is None
    ):
        raise BnmoveError(
            "--quantize needs onnxruntime's quantization tools: pip install 'bnmove[cpu]' (or [gpu])"
        )
    if not calibration_given:
        raise BnmoveError("--quantize needs --calibration-data: the samples it calibrates the int8 ranges on")


@dataclass(frozen=True)
class QuantizationSamples:
    """The samples every variant is quantized with, and those held out to check the result."""

    calibrate: list[Batch]
    held_out: list[Batch]
    #: which of `QUANTIZATIONS`
    kind: str = "int8"

    @classmethod
    def split(cls, batches: Sequence[Batch], kind: str = "int8") -> QuantizationSamples:
        calibrate, held_out = split_held_out(list(batches))
        if not held_out:
            raise BnmoveError(
                "--quantize needs at least 2 calibration samples (some are held out to check it)"
            )
        return cls(calibrate, held_out, kind)

    def samples(self) -> tuple[int, int]:
        return sum(len(b[0]) for b in self.calibrate), sum(len(b[0]) for b in self.held_out)


def _feeds(batches: Sequence[Batch], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """One feed per sample (a batch of one), so a static-batch export takes them too."""
    feeds = []
    for batch in batches:
        arrays = [
            t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in batch
        ]
        for i in range(len(arrays[0])):
            feeds.append({name: a[i : i + 1] for name, a in zip(names, arrays, strict=True)})
    return feeds


def float_nodes(model: Any) -> list[dict[str, str]]:
    """Every compute node of a QDQ model that runs in float, with the reason."""
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    left = []
    for node in model.graph.node:
        if node.op_type in _QDQ:
            continue
        quantized_input = any(produced_by.get(name) == "DequantizeLinear" for name in node.input)
        if node.op_type == "BatchNormalization":
            reason = (
                "onnxruntime has no int8 BatchNormalization: it runs in float between dequantize and "
                "quantize; no exact rule folded this BN (see the variant's bns for why)"
            )
        elif not quantized_input:
            reason = f"onnxruntime's static quantization does not quantize {node.op_type} here"
        else:
            continue
        left.append({"node": node.name, "op": node.op_type, "reason": reason})
    return left


def _standalone_bn_axis(record: logging.LogRecord) -> bool:
    """Drop onnxruntime's "Axis 1 is out-of-range for weight 'bn.weight' with rank 1", logged on the
    root logger for each BN left standing: its per-channel weight axis does not apply to the BN's
    1-D parameters, which stay float, as ``float_nodes`` reports with the reason."""
    return not (record.levelno == logging.WARNING and "is out-of-range for weight" in record.getMessage())


def quantize_variant(
    float_path: Path, out_path: Path, calibration: QuantizationSamples, work: Path
) -> dict[str, Any]:
    """Write ``out_path``, the INT8 form of ``float_path``; returns its manifest entry."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in onnx.load(str(float_path), load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.feeds = iter(_feeds(calibration.calibrate, names))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    activations, symmetric, form = _FORMS[calibration.kind]
    prepared = work / f"{float_path.stem}.pre.onnx"
    root = logging.getLogger()
    root.addFilter(_standalone_bn_axis)
    try:
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, activations),
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    except Exception as exc:
        raise BnmoveError(
            f"{float_path.name}: onnxruntime's quantization failed ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        root.removeFilter(_standalone_bn_axis)
    float_session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    int8_session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    meter = Agreement()
    for feed in _feeds(calibration.held_out, names):
        meter.add(float_session.run(None, feed), int8_session.run(None, feed))
    measured = meter.result()
    calibrated, held_out = calibration.samples()
    return {
        "file": out_path.name,
        "format": form,
        "calibration_samples": calibrated,
        "held_out_samples": held_out,
        "top1_agreement_with_float": measured.top1,
        "max_rel_error_vs_float": measured.rel,
        "float_nodes": float_nodes(onnx.load(str(out_path))),
        "file_size": out_path.stat().st_size,
    }

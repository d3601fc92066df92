"""How far one model's outputs are from another's: one measure, one tolerance policy.

Every comparison bnmove makes goes through [`Agreement`][bnmove.core.fidelity.Agreement] (a conversion's verification,
the calibration check, export's onnxruntime-against-PyTorch check, ``compare``'s deviations,
INT8 against float): outputs of any structure, empty tensors and integer outputs included,
measured in float64 whatever the models' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..errors import BnmoveError
from .running import eval_mode, output_tensors, run_model, untouched

Array = torch.Tensor | np.ndarray

#: relative deviation beyond which an ONNX file computes something else than its PyTorch model
#: (float32 rounding through an exported, optimised graph stays far below it)
ONNX_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Difference:
    """``got`` against ``want`` over every output tensor of every call measured."""

    max_abs: float
    mean_abs: float
    #: the largest |want|: what `rel` is relative to
    scale: float
    #: of all float outputs flattened together; 1.0 when both are all zero
    cosine: float
    #: fraction of samples with the same argmax, where each call's first output is a batch
    #: of class scores (N x C, C > 1); None otherwise
    top1: float | None
    #: samples behind `top1`
    samples: int = 0

    @property
    def rel(self) -> float:
        """`max_abs` relative to `scale` (0 where nothing differs)."""
        return self.max_abs / max(self.scale, 1e-12) if self.max_abs else 0.0


class Agreement:
    """Accumulates `Difference` over calls: ``add(want, got)`` once per batch, then `result`.

    Example:
        >>> meter = Agreement()
        >>> for x in batches:
        ...     meter.add(output_tensors(reference(x)), output_tensors(candidate(x)))
        >>> meter.result().rel
    """

    def __init__(self) -> None:
        self._max_abs = self._sum_abs = self._scale = self._dot = self._ww = self._gg = 0.0
        self._elements = self._agree = self._samples = 0

    def add(self, want: Sequence[Array], got: Sequence[Array]) -> None:
        """One call's outputs, paired in order; a different count or shape is a [`BnmoveError`][bnmove.BnmoveError]."""
        if len(want) != len(got):
            raise BnmoveError(f"outputs differ in number: {len(got)} against {len(want)}")
        for i, (a, b) in enumerate(zip(want, got, strict=True)):
            w, g = _tensor(a), _tensor(b)
            if w.shape != g.shape:
                raise BnmoveError(f"output {i} has shape {tuple(g.shape)} against {tuple(w.shape)}")
            if not w.numel():
                continue
            if not w.is_floating_point():  # indices, labels, masks: equal or not
                self._max_abs = max(self._max_abs, float((w != g).any()))
                continue
            w, g = w.double(), g.double()
            diff = (w - g).abs()
            self._max_abs = max(self._max_abs, float(diff.max()))
            self._sum_abs += float(diff.sum())
            self._elements += diff.numel()
            self._scale = max(self._scale, float(w.abs().max()))
            self._dot += float((w * g).sum())
            self._ww += float((w * w).sum())
            self._gg += float((g * g).sum())
        if want:
            w, g = _tensor(want[0]), _tensor(got[0])
            if w.dim() == 2 and w.shape[1] > 1 and w.is_floating_point():
                self._agree += int((w.argmax(1) == g.argmax(1)).sum())
                self._samples += w.shape[0]

    def result(self) -> Difference:
        norm = math.sqrt(self._ww * self._gg)
        cosine = self._dot / norm if norm > 0 else (1.0 if self._ww == self._gg == 0 else 0.0)
        return Difference(
            max_abs=self._max_abs,
            mean_abs=self._sum_abs / self._elements if self._elements else 0.0,
            scale=self._scale,
            cosine=min(cosine, 1.0),
            top1=self._agree / self._samples if self._samples else None,
            samples=self._samples,
        )


def difference(want: Sequence[Array], got: Sequence[Array]) -> Difference:
    """`Difference` of one call's outputs."""
    meter = Agreement()
    meter.add(want, got)
    return meter.result()


def _tensor(x: Array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance (of the output's magnitude) that float rounding can explain."""
    return {torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-9}.get(dtype, 1e-4)


#: absolute errors below ``tolerance * ABS_FLOOR`` (1e-6 in float32) are rounding whatever the outputs' size
ABS_FLOOR = 1e-2


@dataclass(frozen=True)
class Deviation:
    """How far converted outputs are from the original's on the same inputs (eval mode)."""

    max_abs_error: float
    max_rel_error: float
    input_shapes: list[list[int]]
    tolerance: float
    #: the same conversion made and compared on a float64 copy, when the float32 comparison
    #: exceeds its tolerance: it tells float rounding the network amplifies from a changed function
    float64_rel_error: float | None = None

    @property
    def within_tolerance(self) -> bool:
        if self.max_abs_error <= self.tolerance * ABS_FLOOR:
            return True  # outputs near zero: a relative error says nothing about rounding there
        if self.float64_rel_error is not None:
            return self.float64_rel_error <= tolerance_for(torch.float64)
        return self.max_rel_error <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "within_tolerance": self.within_tolerance}


def compare_models(reference: nn.Module, converted: nn.Module, inputs: Sequence[Any]) -> Deviation:
    """Max abs error and error relative to the reference's largest |output|, in eval mode.

    Every tensor of any output structure (tuples, dicts, dataclasses) is
    compared. The reference runs without keeping anything its forward caches.
    """
    with eval_mode(reference), untouched(reference):
        want = output_tensors(run_model(reference, inputs))
    with eval_mode(converted):
        got = output_tensors(run_model(converted, inputs))
    try:
        measured = difference(want, got)
    except BnmoveError as exc:
        raise BnmoveError(
            f"the converted model returns outputs of another structure ({exc}; bnmove bug)"
        ) from exc
    dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    deviation = Deviation(
        max_abs_error=measured.max_abs,
        max_rel_error=measured.rel,
        input_shapes=[list(x.shape) for x in tree_flatten(list(inputs))[0] if isinstance(x, torch.Tensor)],
        tolerance=tolerance_for(dtype),
    )
    return deviation

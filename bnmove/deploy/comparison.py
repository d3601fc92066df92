"""What ``compare`` measured, as values: per variant its nodes and precision, per variant and batch
size its latency with the ratio's interval, its output deviation, accuracy and the noise floor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.fidelity import ONNX_TOLERANCE
from ..core.threads import ThreadChoice
from ..errors import BnmoveError
from .accuracy import Accuracy
from .noise import RatioInterval, too_noisy


@dataclass(frozen=True)
class Timing:
    variant: str
    batch_size: int
    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    #: samples per second at the median latency
    throughput: float
    #: median latency / the reference's median latency at this batch size. The median, not the
    #: mean, throughout: one slow outlier run (a page fault, a scheduler hiccup) moves a mean of
    #: 50 runs by several percent and made identical files read 1.09x.
    ratio: float
    #: the ratio's 95% interval over the timed rounds (bootstrap, rounds resampled in pairs)
    ratio_low: float = float("nan")
    ratio_high: float = float("nan")


@dataclass(frozen=True)
class OutputDeviation:
    variant: str
    max_abs: float
    mean_abs: float
    cosine: float
    #: fraction of samples whose argmax agrees with the reference (class-score outputs only)
    top1_agreement: float | None
    #: max abs deviation relative to the reference's largest |output|
    max_rel: float = 0.0

    @property
    def deviates(self) -> bool:
        """Computes something else than the reference, beyond what float rounding explains."""
        return self.max_rel > ONNX_TOLERANCE


@dataclass(frozen=True)
class VariantInfo:
    name: str
    path: str
    file_size: int
    #: node counts by op type after onnxruntime's optimisations (on the session that checks
    #: outputs: the CPU provider, or CUDA for the GPU providers, since TensorRT cannot save its graph)
    optimized_nodes: dict[str, int]
    #: what the variant computes in: "float32", "int8", or "int8 emulated in float" (QDQ on the
    #: CUDA provider, which has no int8 convolution)
    precision: str = "float32"

    @property
    def batchnorms(self) -> int:
        return sum(v for k, v in self.optimized_nodes.items() if k.endswith("BatchNormalization"))


@dataclass
class Comparison:
    """What [`bnmove.compare`][bnmove.compare] measured: per variant its node counts after onnxruntime's
    optimisations, per variant and batch size its latency, and its output deviation from the
    reference variant, on one provider and device."""

    provider: str
    device: str
    onnxruntime: str
    created: str
    reference: str
    variants: list[VariantInfo]
    timings: list[Timing]
    deviations: list[OutputDeviation]
    batch_sizes: list[int] = field(default_factory=list)
    #: top-1 accuracy per variant on the labelled data, when given
    accuracies: list[Accuracy] = field(default_factory=list)
    #: per batch size, a byte-identical copy of the reference timed in the same rounds: the ratio
    #: two identical graphs show on this machine during this run (`bnmove.deploy.noise`)
    noise_floor: dict[int, RatioInterval] = field(default_factory=dict)
    #: how the timings ran ("CUDA, TF32 allowed (the provider's default)", ...)
    timed_with: str = ""
    #: how deviations, node counts and accuracy were measured ("CUDA, TF32 off ...")
    checked_with: str = ""
    #: CPU: per batch size, the intra-op threads the timings ran with and how they were chosen
    threads: dict[int, ThreadChoice] = field(default_factory=dict)

    def too_noisy(self, batch_size: int) -> bool:
        """Whether, at this batch size, the noise floor is as wide as every difference measured."""
        floor = self.noise_floor.get(batch_size)
        others = [
            RatioInterval(t.ratio, t.ratio_low, t.ratio_high)
            for t in self.timings
            if t.batch_size == batch_size and t.variant != self.reference
        ]
        return floor is not None and too_noisy(floor, others)

    def timing(self, variant: str, batch_size: int) -> Timing:
        """The timing of one variant at one batch size; a clear error for one that was not timed."""
        for t in self.timings:
            if t.variant == variant and t.batch_size == batch_size:
                return t
        timed = ", ".join(sorted({f"{t.variant}@{t.batch_size}" for t in self.timings})) or "none"
        raise BnmoveError(f"no timing for variant {variant!r} at batch size {batch_size} (timed: {timed})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "device": self.device,
            "onnxruntime": self.onnxruntime,
            "created": self.created,
            "reference": self.reference,
            "batch_sizes": self.batch_sizes,
            "timed_with": self.timed_with,
            "checked_with": self.checked_with,
            "threads": [
                {"batch_size": b, "threads": c.threads, "chosen": c.describe()}
                for b, c in self.threads.items()
            ],
            "variants": [{**asdict(v), "batchnorms_after_optimization": v.batchnorms} for v in self.variants],
            "timings": [asdict(t) for t in self.timings],
            "deviations": [asdict(d) for d in self.deviations],
            "accuracies": [a.to_dict() for a in self.accuracies],
            "noise_floor": [
                {"batch_size": b, **asdict(f), "too_noisy": self.too_noisy(b)}
                for b, f in self.noise_floor.items()
            ],
        }

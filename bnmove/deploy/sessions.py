"""One onnxruntime session per provider, opened the way that provider needs, and checked.

Each provider wants its own settings, and onnxruntime silently does something else when they are
wrong, so every session bnmove opens is described by a `SessionPlan` (a value) and opened
by `open_session`, which checks the result:

- **CPU and CUDA** write their optimised graph to a file, which is how ``compare`` counts the
  nodes (BatchNorms included) that survive onnxruntime's fusions. The CUDA provider computes
  float32 convolutions and matrix products in TF32 by default on Ampere and later GPUs (about 1e-3
  relative): timings keep that default, deviations are measured with ``use_tf32=0``.
- **TensorRT** cannot write an optimised graph (its compiled nodes do not serialise: onnxruntime
  refuses the whole session), so node counts come from a CUDA session. Its nodes that TensorRT
  rejects run on CUDA, not on the CPU (CUDA is its listed fallback). Engines and timing caches
  go to a folder (``cache_dir``), so a second run starts in seconds, not minutes. Each timed batch
  size gets its own engine, built for exactly that shape (profile min = opt = max): an engine
  built for the largest batch seen so far times smaller batches slower than they run. QDQ (INT8)
  files are built as INT8 engines (``trt_int8_enable``), and only when their activations are
  signed and symmetric, the only int8 TensorRT builds (`tensorrt_int8_problem`).

After creation, the session's actual provider is checked against the one asked for: onnxruntime
falls back to the CPU on an error, printing a banner on stdout; here that banner is caught (stdout
stays clean for ``--json``), fallback at run time is switched off, and a session that is not on
the provider asked for is one clear error.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BnmoveError
from .providers import PROVIDERS, _banner_reason, _silenced_stderr, first_line, import_onnxruntime

if TYPE_CHECKING:  # onnx costs 0.7 s to import: only the commands that export load it
    import onnx


@dataclass(frozen=True)
class SessionPlan:
    """How to open a session: the provider and the settings it needs (a value: hashable, reused)."""

    #: bnmove's name: "tensorrt", "cuda" or "cpu"
    provider: str
    #: the GPU, as this process numbers them (after ``CUDA_VISIBLE_DEVICES``)
    device_id: int = 0
    #: CUDA: TF32 for float32 convolutions and matrix products (the provider's default); False
    #: measures in full float32
    tf32: bool = True
    #: TensorRT: where engines and timing caches are kept between runs
    cache_dir: Path | None = None
    #: TensorRT: the one shape per input its engine is built for (min = opt = max)
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: TensorRT: build an INT8 engine (for QDQ files)
    int8: bool = False
    #: CPU: intra-op threads (None: onnxruntime's default, one per core)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise BnmoveError(f"unknown provider {self.provider!r}; choose from {', '.join(PROVIDERS)}")

    @property
    def writes_optimized_graph(self) -> bool:
        """Whether the session can save its optimised graph (TensorRT's compiled nodes cannot)."""
        return self.provider != "tensorrt"

    def providers(self) -> list[tuple[str, dict[str, str]]]:
        """What ``InferenceSession(providers=...)`` takes: each provider with its options, in order."""
        device = {"device_id": str(self.device_id)}
        if self.provider == "cpu":
            return [("CPUExecutionProvider", {})]
        cuda = ("CUDAExecutionProvider", {**device, "use_tf32": "1" if self.tf32 else "0"})
        if self.provider == "cuda":
            return [cuda]
        options = dict(device)
        if self.cache_dir is not None:
            options.update(
                trt_engine_cache_enable="1",
                trt_engine_cache_path=str(self.cache_dir),
                trt_timing_cache_enable="1",
                trt_timing_cache_path=str(self.cache_dir),
            )
        if self.shapes:
            profile = ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in self.shapes)
            options.update(
                trt_profile_min_shapes=profile, trt_profile_opt_shapes=profile, trt_profile_max_shapes=profile
            )
        if self.int8:
            options["trt_int8_enable"] = "1"
        # nodes TensorRT rejects run on CUDA with its defaults, as a CUDA-only session would
        return [("TensorrtExecutionProvider", options), ("CUDAExecutionProvider", device)]

    def describe(self) -> str:
        """How this plan computes, in a few words (for reports)."""
        if self.provider == "cpu":
            return "the CPU provider (float32; int8 kernels for QDQ files)"
        if self.provider == "cuda":
            return "CUDA, " + ("TF32 allowed (the provider's default)" if self.tf32 else "TF32 off (float32)")
        return "TensorRT, " + ("INT8 engine" if self.int8 else "float32 engine, TF32 allowed (its default)")


def open_session(path: Path, plan: SessionPlan, *, optimized: Path | None = None) -> Any:
    """An ``InferenceSession`` for ``path`` on exactly the plan's provider, or one clear error.

    ``optimized``: where to save the optimised graph (ignored for TensorRT, which cannot).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized is not None and plan.writes_optimized_graph:
        options.optimized_model_filepath = str(optimized)
    if plan.threads is not None:
        options.intra_op_num_threads = plan.threads
    if plan.provider == "cpu":
        # sessions timed in turn: a thread pool that spins after its run steals the next session's
        # cores (identical files then read 0.5-2x of each other at 2 threads on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if plan.cache_dir is not None:
        plan.cache_dir.mkdir(parents=True, exist_ok=True)
    banner = io.StringIO()
    quiet = _silenced_stderr() if plan.provider != "cpu" else contextlib.nullcontext()
    try:  # (its warning for a provider this build lacks: the check below says it in one line)
        with quiet, contextlib.redirect_stdout(banner), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            session = ort.InferenceSession(str(path), options, providers=plan.providers())
    except Exception as exc:
        raise BnmoveError(f"{path}: onnxruntime cannot load it ({first_line(exc)})") from exc
    session.disable_fallback()  # an error while running is an error, not a silent move to the CPU
    check_providers(session.get_providers(), plan, path, banner.getvalue())
    return session


def check_providers(actual: list[str], plan: SessionPlan, path: Path | str, banner: str = "") -> None:
    """One clear error when onnxruntime put the session on another provider than the plan's."""
    wanted = PROVIDERS[plan.provider]
    if actual and actual[0] == wanted:
        return
    got = actual[0] if actual else "no provider"
    if wanted not in import_onnxruntime().get_available_providers():
        why = f"this onnxruntime build has no {wanted}"
    else:
        why = _banner_reason(banner, got)
    raise BnmoveError(f"{path}: onnxruntime opened it on {got}, not {wanted} as asked ({why})")


def tensorrt_int8_problem(model: Any) -> str | None:
    """Why TensorRT cannot build this QDQ model as INT8, or None when it can.

    TensorRT takes only signed int8 with zero points of 0 (symmetric); onnxruntime's CPU-oriented
    QDQ uses uint8 activations with a zero point.
    """
    zero_points = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        point = zero_points.get(node.input[2])
        if point is None:
            continue
        from onnx import TensorProto, numpy_helper

        if point.data_type != TensorProto.INT8:
            kind = TensorProto.DataType.Name(point.data_type).lower()
            return f"its activations are {kind} (TensorRT builds only signed, symmetric int8)"
        if numpy_helper.to_array(point).any():
            return "its activations have non-zero zero points (TensorRT builds only symmetric int8)"
    return None


def is_qdq(model: Any) -> bool:
    """Whether the model is quantized in the QDQ format."""
    return any(node.op_type == "QuantizeLinear" for node in model.graph.node)


def int8_execution(provider: str) -> str:
    """What an INT8 (QDQ) file really runs as on ``provider``, for tables and JSON."""
    if provider == "cuda":
        # onnxruntime's CUDA provider has no int8 convolution: DequantizeLinear -> float Conv ->
        # QuantizeLinear, so the timing is of float math plus the (de)quantization around it
        return "int8 emulated in float"
    return "int8"


def default_cache_dir() -> Path:
    """Where TensorRT engines are kept unless told: ``$XDG_CACHE_HOME/bnmove/tensorrt``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnmove" / "tensorrt"


DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _label(node: onnx.NodeProto) -> str:
    if node.domain in ("", "ai.onnx"):
        return node.op_type
    return f"{node.domain.rsplit('.', 1)[-1]}.{node.op_type}"


class Runner:
    """One variant's session (opened by `open_session`), with device-bound I/O on GPU providers."""

    def __init__(self, path: Path, plan: SessionPlan, tmp: Path | None = None) -> None:
        """``tmp``: a folder to save the optimised graph in, to count its nodes (None: not counted)."""
        import onnx

        optimized = tmp / f"{path.stem}.optimized.onnx" if tmp is not None else None
        self.session = open_session(path, plan, optimized=optimized)
        self.plan = plan
        self.optimized_nodes: dict[str, int] = {}
        if optimized is not None and optimized.exists():
            proto = onnx.load(str(optimized), load_external_data=False)
            self.optimized_nodes = dict(Counter(_label(n) for n in proto.graph.node).most_common())
        self.inputs = self.session.get_inputs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._binding: Any = None

    def feeds(self, batch: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        arrays = []
        for spec in self.inputs:
            shape = []
            for i, dim in enumerate(spec.shape):
                if isinstance(dim, int):
                    shape.append(dim)
                elif i == 0:
                    shape.append(batch)
                else:
                    raise BnmoveError(f"input {spec.name} has a dynamic dimension {dim!r} besides the batch")
            dtype = DTYPES.get(spec.type)
            if dtype is None:
                raise BnmoveError(f"input {spec.name} has type {spec.type}, which compare cannot generate")
            arrays.append(rng.standard_normal(shape).astype(dtype))
        return arrays

    def static_batch(self) -> int | None:
        first = self.inputs[0].shape[0] if self.inputs[0].shape else None
        return first if isinstance(first, int) else None

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        result: list[np.ndarray] = self.session.run(
            None, {s.name: a for s, a in zip(self.inputs, arrays, strict=True)}
        )
        return result

    def bind(self, arrays: list[np.ndarray]) -> None:
        """Put inputs on the device once; outputs are allocated there too."""
        if self.plan.provider == "cpu":
            self._arrays = arrays
            return
        ort = import_onnxruntime()
        binding = self.session.io_binding()
        device = self.plan.device_id
        for spec, array in zip(self.inputs, arrays, strict=True):
            binding.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", device))
        for name in self.output_names:
            binding.bind_output(name, "cuda", device)
        self._binding = binding

    def timed_run(self) -> float:
        if self._binding is not None:
            start = time.perf_counter()
            self.session.run_with_iobinding(self._binding)
            return time.perf_counter() - start
        feeds = {s.name: a for s, a in zip(self.inputs, self._arrays, strict=True)}
        start = time.perf_counter()
        self.session.run(None, feeds)
        return time.perf_counter() - start

"""onnxruntime and its providers: imported when needed, each provider probed before it is chosen."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BnmoveError

PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


#: per provider, None once it ran here, else why not (probed once per process)
_WORKS: dict[str, str | None] = {}


def import_onnxruntime() -> Any:
    """onnxruntime, or one line saying how to install the build that fits this machine."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BnmoveError(
            "onnxruntime is not installed: pip install 'bnmove[gpu]' on a CUDA machine "
            "(onnxruntime-gpu), 'bnmove[cpu]' elsewhere (onnxruntime); ./install.sh picks for you"
        ) from None
    return ort


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """onnxruntime's C++ side prints library-load errors straight to fd 2; hide them while probing."""
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (e.g. some test runners): nothing to hide
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _nvidia_driver_present() -> bool:
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _preload_torch_cuda_libraries() -> None:
    """With a CUDA build of torch installed, let onnxruntime reuse its CUDA/cuDNN libraries."""
    ort = import_onnxruntime()
    try:
        import torch

        if torch.version.cuda and hasattr(ort, "preload_dlls"):
            with _silenced_stderr():
                ort.preload_dlls()
    except Exception:  # best effort: onnxruntime may still find system libraries
        pass


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def provider_works(name: str) -> bool:
    """Whether onnxruntime can really run on ``name`` ("tensorrt", "cuda", "cpu") here."""
    return provider_problem(name) is None


def provider_problem(name: str) -> str | None:
    """Why onnxruntime cannot run on ``name`` here (None when it can): probed once, by running a
    one-node model on it, the error kept."""
    if name == "cpu":
        return None
    if name in _WORKS:
        return _WORKS[name]
    ort = import_onnxruntime()
    problem: str | None
    if PROVIDERS[name] not in ort.get_available_providers():
        problem = f"this onnxruntime build has no {PROVIDERS[name]} (pip install onnxruntime-gpu)"
    elif not _nvidia_driver_present():
        problem = "no NVIDIA driver (libcuda) found"
    else:
        _preload_torch_cuda_libraries()
        options = ort.SessionOptions()
        options.log_severity_level = 4
        banner = io.StringIO()
        try:  # onnxruntime prints its fallback banner on stdout, and library errors on fd 2
            with _silenced_stderr(), contextlib.redirect_stdout(banner):
                session = ort.InferenceSession(
                    _probe_model(), options, providers=[PROVIDERS[name], "CPUExecutionProvider"]
                )
                session.run(None, {"x": np.ones(1, np.float32)})
            actual = session.get_providers()[0]
            problem = None if actual == PROVIDERS[name] else _banner_reason(banner.getvalue(), actual)
        except Exception as exc:
            problem = first_line(exc)
    _WORKS[name] = problem
    return problem


def first_line(exc: BaseException) -> str:
    """An exception's first line, at most 200 characters (onnxruntime's errors run to dozens of lines)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _banner_reason(banner: str, actual: str) -> str:
    """The first line of onnxruntime's fallback banner ("EP Error ..."), or what it fell back to."""
    why = next((line.strip() for line in banner.splitlines() if line.startswith("EP Error")), "")
    return why[:200] or f"onnxruntime fell back to {actual}"


def select_provider(requested: str = "auto") -> str:
    """``auto`` -> the best that works here (TensorRT, CUDA, CPU); an unavailable explicit choice is an error."""
    if requested == "auto":
        for name in ("tensorrt", "cuda", "cpu"):
            if provider_works(name):
                return name
    if requested not in PROVIDERS:
        raise BnmoveError(f"unknown provider {requested!r}; choose auto, {', '.join(PROVIDERS)}")
    problem = provider_problem(requested)
    if problem is not None:
        available = [n for n in PROVIDERS if provider_works(n)]
        raise BnmoveError(
            f"provider {requested!r} is not available here (onnxruntime "
            f"{import_onnxruntime().__version__}: {problem}); available: {', '.join(available)}"
        )
    return requested


def _device_name(provider: str) -> str:
    if provider != "cpu":
        try:
            import torch

            if torch.cuda.is_available():
                return str(torch.cuda.get_device_name(0))
        except Exception:
            pass
        return "NVIDIA GPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()

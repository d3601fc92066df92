"""The GPUs a study runs on: checked before any work, mapped right for child processes, made current
in each run, and (when asked) deterministic.

GPU numbers are this process's: ``cuda:1`` is the second GPU torch sees, which under SLURM or
Kubernetes (``CUDA_VISIBLE_DEVICES=2,3``) is physical GPU 3. A ``--run`` command is started with
``CUDA_VISIBLE_DEVICES`` naming that one GPU, so it must be the parent's entry, not the index.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence

import torch

from ..errors import BnmoveError


def parse_devices(names: Sequence[str]) -> list[torch.device]:
    """torch devices from names (``cpu``, ``cuda``, ``cuda:1``), or one clear error."""
    devices = []
    for name in names:
        try:
            devices.append(torch.device(name))
        except RuntimeError:
            raise BnmoveError(f"device {name!r}: not a device name (cpu, cuda, cuda:0, ...)") from None
    return devices


def check_devices(devices: Sequence[torch.device], count: Callable[[], int] | None = None) -> None:
    """Every CUDA device exists here, before any work starts. ``count``: how many GPUs torch sees
    (``torch.cuda.device_count``; a parameter for tests)."""
    for device in devices:
        if device.type != "cuda":
            continue
        if not torch.cuda.is_available() and count is None:
            raise BnmoveError(f"device {device}: no CUDA GPU is visible to torch")
        visible = (count or torch.cuda.device_count)()
        if device.index is not None and device.index >= visible:
            raise BnmoveError(
                f"device {device}: torch sees {visible} GPU(s) here (cuda:0 to cuda:{visible - 1})"
                if visible
                else f"device {device}: no CUDA GPU is visible to torch"
            )


def physical_gpu(index: int, visible: str | None) -> str:
    """What to put in ``CUDA_VISIBLE_DEVICES`` for a child that should see only ``cuda:index`` of
    this process: the parent's own entry when it restricts devices (``"2,3"`` and ``cuda:1`` ->
    ``"3"``; UUIDs pass through), else the index."""
    if visible is None:
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids):
        raise BnmoveError(
            f"device cuda:{index}: CUDA_VISIBLE_DEVICES={visible!r} makes {len(ids)} GPU(s) visible"
            if ids
            else f"device cuda:{index}: CUDA_VISIBLE_DEVICES is empty, so no GPU is visible"
        )
    return ids[index]


@contextlib.contextmanager
def on_device(device: torch.device, deterministic: bool = False) -> Iterator[None]:
    """Make ``device`` the current GPU while a run trains (so streams, pinned-memory threads and
    caches open on it, not on GPU 0), and with ``deterministic``, use only deterministic kernels.

    Deterministic CUDA costs speed (no cuDNN autotuning, deterministic scatter and index kernels;
    how much depends on the model) and needs ``CUBLAS_WORKSPACE_CONFIG`` before cuBLAS starts,
    which is set here when missing. An op with no deterministic kernel is an error, not a silent
    difference.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]

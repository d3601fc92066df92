"""Calibration data and what bnmove does with it.

* `calibration_batches` turns what users have (a tensor, a sequence of
  tensors or tuples, a DataLoader, or files) into input batches.
* `bnmove.fitting.sequential` fits pairs and refits layers from calibration data in two
  passes, by module hooks.
* `bnmove.fitting.refit` re-fits a Conv/Linear by ridge least squares so that, fed
  the converted model's activations, it reproduces the original model's output.
* [`recalibrate`][bnmove.recalibrate] re-estimates every BatchNorm's running statistics as exact
  averages over the data.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.clone import clone_module
from ..core.progress import OnProgress, Stage
from ..core.running import eval_mode
from ..errors import BnmoveError, ModelRunError

Batch = tuple[torch.Tensor, ...]


def _as_batch(item: Any, where: str) -> Batch:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, np.ndarray):
        return (torch.from_numpy(item),)
    if (
        isinstance(item, (tuple, list))
        and item
        and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in item)
    ):
        return tuple(torch.as_tensor(t) for t in item)
    if isinstance(item, dict) and "x" in item:
        return _as_batch(item["x"], where)
    raise BnmoveError(f"{where}: expected tensors (or tuples of tensors), got {type(item).__name__}")


def split_held_out(
    batches: list[Batch], fraction: float = 0.2, minimum: int = 32
) -> tuple[list[Batch], list[Batch]]:
    """``(fit, held_out)``: the last ``fraction`` of the samples (at least ``minimum``, at most half)
    are kept out of every fit, so fidelity is reported on data the fit did not see."""
    total = sum(len(b[0]) for b in batches)
    held = min(max(round(total * fraction), minimum), total // 2)
    if held == 0:
        return batches, []
    fit: list[Batch] = []
    out: list[Batch] = []
    seen = 0
    for batch in batches:
        n = len(batch[0])
        cut = min(max(total - held - seen, 0), n)
        if cut:
            fit.append(tuple(t[:cut] for t in batch))
        if cut < n:
            out.append(tuple(t[cut:] for t in batch))
        seen += n
    return fit, out


def calibration_batches(data: Any, *, samples: int = 256) -> list[Batch]:
    """Input batches holding at most ``samples`` samples in all.

    ``data``: a tensor (the batch dimension first), a sequence of tensors or
    tuples of tensors (each one batch), or a DataLoader/iterable of such.
    """
    if samples < 1:
        raise BnmoveError("calibration samples must be at least 1")
    if isinstance(data, list) and data and all(isinstance(b, tuple) for b in data):
        items: Iterable[Any] = data  # already batches
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        items = [data]
    elif isinstance(data, (str, Path)):
        items = load_calibration_files(Path(data))
    else:
        items = data
    batches: list[Batch] = []
    total = 0
    for item in items:
        batch = _as_batch(item, "calibration data")
        if any(not t.is_floating_point() for t in batch[:1]):
            batch = (batch[0].float(), *batch[1:])
        take = min(len(batch[0]), samples - total)
        batches.append(tuple(t[:take] for t in batch))
        total += take
        if total >= samples:
            break
    if not batches or total == 0:
        raise BnmoveError("calibration data is empty")
    return batches


def load_calibration_files(path: Path) -> list[Any]:
    """``.pt``/``.pth`` (tensors, weights_only), ``.npy``, ``.npz`` (``x`` or its first array), or a folder."""
    if not path.exists():
        raise BnmoveError(f"{path}: no such file or folder")
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".npy", ".npz"))
        if path.is_dir()
        else [path]
    )
    if not files:
        raise BnmoveError(f"{path}: no .pt, .pth, .npy or .npz files in this folder")
    items: list[Any] = []
    for file in files:
        try:
            if file.suffix in (".pt", ".pth"):
                obj = torch.load(file, map_location="cpu", weights_only=True)
            elif file.suffix == ".npy":
                obj = np.load(file, allow_pickle=False)
            elif file.suffix == ".npz":
                with np.load(file, allow_pickle=False) as archive:
                    if not archive.files:
                        raise BnmoveError(f"{file}: empty .npz archive")
                    obj = archive["x" if "x" in archive.files else archive.files[0]]
            else:
                raise BnmoveError(f"{file}: unsupported calibration file type {file.suffix or '(none)'}")
        except BnmoveError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BnmoveError(f"{file}: cannot read it as calibration data ({first[:160]})") from exc
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
            items.extend(obj if obj[0].dim() > 1 and len({t.shape[1:] for t in obj}) == 1 else [tuple(obj)])
        else:
            items.append(obj)
    for item in items:
        _as_batch(item, str(path))
    return items


def call_model(model: nn.Module, batch: Batch) -> Any:
    """Call ``model`` the way the batch needs: all its tensors, or just as many as forward takes
    (a ``(x, y)`` pair from a labelled dataset feeds ``x`` only)."""
    try:
        params = [
            p
            for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        takes_varargs = any(
            p.kind == p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()
        )
    except (TypeError, ValueError):
        params, takes_varargs = [], True
    args = batch if takes_varargs or len(batch) <= len(params) else batch[: max(len(params), 1)]
    return model(*args)


def recalibrate(
    model: nn.Module, data: Any, *, samples: int | None = None, on_progress: OnProgress | None = None
) -> nn.Module:
    """A copy of ``model`` whose BatchNorms hold exact averages of their inputs over ``data``.

    BatchNorms run in train mode (normalising with batch statistics, as in
    training) while every other layer stays in eval mode (dropout off). Each
    BN's running mean and (unbiased) variance become the exact mean and variance
    of everything it saw, weighting every sample equally whatever the batch sizes.
    Use it after fine-tuning: the running averages training leaves lag behind
    weights that moved fast, most of all just after a conversion. ``on_progress`` is given a
    [`Stage`][bnmove.Stage] after each batch ("recalibrating", batches done, batches in all).
    """
    work = clone_module(model)
    batches = calibration_batches(data, samples=samples or 10**12)
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    done = 0

    def run(batch: Batch) -> None:
        nonlocal done
        try:
            call_model(work, tuple(t.to(device) for t in batch))
        except Exception as exc:
            raise ModelRunError(f"the model failed on the data: {type(exc).__name__}: {exc}") from exc
        done += 1
        if on_progress is not None:
            on_progress(Stage("recalibrating", done, len(batches)))

    precise_statistics(work, batches, run)
    return work


def precise_statistics(model: nn.Module, batches: Iterable[Any], run: Callable[[Any], None]) -> None:
    """Set every BatchNorm's running mean and variance of ``model`` (in place) to the exact
    averages of its inputs while ``run`` feeds it each of ``batches``, BatchNorms in train mode and
    every other layer in eval mode ("precise BN")."""
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return
    sums: dict[nn.Module, list[Any]] = {}  # [sum, sum of squares, count] per channel

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // x.shape[1]
        acc = sums.setdefault(
            module, [torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)] * 2 + [0]
        )  # type: ignore[list-item]
        acc[0] = acc[0] + x.sum(dims)
        acc[1] = acc[1] + (x * x).sum(dims)
        acc[2] = acc[2] + count  # type: ignore[assignment]

    handles = [bn.register_forward_pre_hook(record) for bn in bns]
    seen = 0
    try:
        with eval_mode(model), torch.no_grad():
            for bn in bns:
                bn.train()
            for batch in batches:
                run(batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        for bn in bns:
            if bn not in sums:
                continue
            total, square, count = sums[bn]
            n = float(count)
            mean = total / n
            var = (square - n * mean * mean) / max(n - 1.0, 1.0)
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))  # type: ignore[union-attr]
            bn.running_var.copy_(var.clamp_min(0).to(bn.running_var.dtype))  # type: ignore[union-attr]
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(seen)

"""Calibrated fitting in two passes over the data, on any model, by module hooks.

Each fitted pair must reproduce what the original block computed, and it should
see the activations of the model converted so far, so that every fit (and the
refit of the layer after it) corrects the errors of those upstream. Replaying the
converted model up to each pair does that at a cost that grows with the square of
the depth. Here it costs two passes, and needs no graph of the whole model:

1. The original model runs over the data (batch by batch). Forward hooks on the
   real modules keep, per fitted pair, a fixed random subset of per-channel rows
   of the pair's input (the block's target follows from it: the block is
   per-channel), and, per layer to refit, the same subset of its output rows.
2. The converted model runs once over all calibration samples together. When the
   forward reaches a fitted BN', a pre-hook fits it on the rows of its real
   input, at the sampled positions, against the original's targets there, and
   sets its parameters before it runs; the layer after it is refitted the same
   way when the forward reaches it. So every fit sees the upstream fits and
   refits, in execution order, in one forward.

Pass 2 holds one forward's activations for the calibration set (256 samples by
default) and the sampled rows; nothing else is kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core import fit_math
from ..core.running import eval_mode
from ..errors import ModelRunError
from ..rules.base import CalibrationSource
from .calibrate import Batch, call_model
from .refit import NormalEquations, Underdetermined, design_rows

#: rows (positions × samples) per fitted pair or refitted layer
ROWS = 16_384


@dataclass(frozen=True, eq=False)
class PairInput:
    """What a fit needs from the original model, read before the pair moves."""

    tap: str  # module in the original whose input (or output, see ``tap_output``) is the pair's input
    tap_output: bool
    placement: str  # the pair's original placement: "before" (BN -> f) or "after" (f -> BN)
    f: Callable[[torch.Tensor], torch.Tensor]
    a: torch.Tensor  # the original BN's eval map a*z + b (float64, CPU)
    b: torch.Tensor
    eps: float
    #: absorbing a kept affine ``A → f → BN′``: BN′'s map, applied to the block's output in the target
    post: tuple[torch.Tensor, torch.Tensor] | None = None
    #: absorbing ``BN′ → f → A``: BN′'s map, where the fit of BN″ starts
    init: tuple[torch.Tensor, torch.Tensor] | None = None

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(PairInput)}


@dataclass(frozen=True, eq=False, kw_only=True)
class PairPlan(PairInput):
    """One fitted pair: where to read its input in the original, where BN' is in the converted model.
    Made once, after the move (`bnmove.pipeline.calibration.Calibrator.plan`)."""

    bn: str  # BN' in the converted model
    refit: str | None = None  # the Conv/Linear after the pair, same name in both models
    #: where the residual stream the refit layer's output is added to can be read: (module,
    #: "input" or "output", argument index); the refit then targets the original sum minus this
    #: model's stream, which also cancels the error the stream carries from upstream
    stream: tuple[str, str, int] | None = None


@dataclass(frozen=True)
class PairFit:
    """What the passes did with one plan: the fit's block error (None: not fitted) and what it says."""

    effect: float | None
    notes: tuple[str, ...]


def _rows(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N·positions, C)``, sample-major; ``channels_last`` for a Linear's
    ``(N, *, C)``."""
    if channels_last or t.dim() <= 2:
        return t.reshape(-1, t.shape[-1])
    return t.transpose(0, 1).reshape(t.shape[1], -1).T


class _Sampler:
    """A fixed random subset of row indices over all samples, and its slice in each batch."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.index: torch.Tensor | None = None

    def pick(self, rows: torch.Tensor, total_samples: int, offset: int, batch: int) -> torch.Tensor:
        per_sample = rows.shape[0] // batch
        if self.index is None:
            total = per_sample * total_samples
            generator = torch.Generator().manual_seed(self.seed)
            self.index = torch.randperm(total, generator=generator)[: min(ROWS, total)].sort().values
        lo, hi = offset * per_sample, (offset + batch) * per_sample
        local = self.index[(self.index >= lo) & (self.index < hi)] - lo
        return rows[local.to(rows.device)]


class SequentialCalibration:
    """Both passes for a set of `PairPlan` (see the module docstring)."""

    def __init__(
        self, plans: Sequence[PairPlan], batches: Sequence[Batch], source: CalibrationSource = "calibrated"
    ) -> None:
        self.plans = list(plans)
        self.source = source  # what the notes call the data
        self.z_rows: list[list[torch.Tensor]] = [[] for _ in self.plans]  # each pair's input rows
        self.effects: list[float | None] = [None for _ in self.plans]
        self.notes: list[list[str]] = [[] for _ in self.plans]
        self.batches = list(batches)
        self.total = sum(len(b[0]) for b in batches)
        self.pair_samplers = [_Sampler(2 * i) for i in range(len(self.plans))]
        self.refit_samplers = [_Sampler(2 * i + 1) for i in range(len(self.plans))]
        self.targets: list[list[torch.Tensor]] = [[] for _ in self.plans]  # refit layers' output rows
        self.streams: list[list[torch.Tensor]] = [[] for _ in self.plans]  # the original's stream rows
        self.current_streams: dict[int, torch.Tensor] = {}  # this model's, in pass 2

    def original_pass(self, original: nn.Module, on_batch: Callable[[], None] | None = None) -> None:
        offset = [0, 0]  # first sample of the current batch, its size
        handles = []
        for i, plan in enumerate(self.plans):
            module = original.get_submodule(plan.tap)

            def keep_z(value: Any, i: int = i) -> None:
                rows = _rows(value.detach())
                picked = self.pair_samplers[i].pick(rows, self.total, offset[0], offset[1])
                self.z_rows[i].append(picked.double().cpu())

            if plan.tap_output:
                handles.append(module.register_forward_hook(lambda m, a, out, k=keep_z: k(out)))
            else:
                handles.append(module.register_forward_pre_hook(lambda m, a, k=keep_z: k(a[0])))
            if plan.refit is not None:
                layer = original.get_submodule(plan.refit)
                linear = isinstance(layer, nn.Linear)

                def keep_target(out: Any, i: int = i, linear: bool = linear) -> None:
                    rows = _rows(out.detach(), channels_last=linear)
                    picked = self.refit_samplers[i].pick(rows, self.total, offset[0], offset[1])
                    self.targets[i].append(picked.double().cpu())

                handles.append(layer.register_forward_hook(lambda m, a, out, k=keep_target: k(out)))
                if plan.stream is not None:

                    def keep_stream(value: Any, i: int = i) -> None:
                        rows = _rows(value.detach())
                        picked = self.refit_samplers[i].pick(rows, self.total, offset[0], offset[1])
                        self.streams[i].append(picked.double().cpu())

                    handles.append(_stream_hook(original, plan.stream, keep_stream))
        try:
            for batch in self.batches:
                offset[1] = len(batch[0])
                _run(original, batch)
                offset[0] += len(batch[0])
                if on_batch is not None:
                    on_batch()
        finally:
            for handle in handles:
                handle.remove()

    def converted_pass(self, converted: nn.Module) -> None:
        """Fit every BN' and refit every layer during one forward of all samples together."""
        handles = []
        for i, plan in enumerate(self.plans):
            handles.append(
                converted.get_submodule(plan.bn).register_forward_pre_hook(
                    lambda m, a, i=i: self._fit_bn(i, m, a[0])
                )
            )
            if plan.refit is not None and self.targets[i] and plan.stream is not None and self.streams[i]:

                def keep_current(value: Any, i: int = i) -> None:
                    index = self.refit_samplers[i].index
                    assert index is not None
                    self.current_streams[i] = _rows(value.detach())[index.to(value.device)].double().cpu()

                handles.append(_stream_hook(converted, plan.stream, keep_current))
            if plan.refit is not None and self.targets[i]:
                handles.append(
                    converted.get_submodule(plan.refit).register_forward_pre_hook(
                        lambda m, a, i=i: self._refit(i, m, a[0])
                    )
                )
        together = tuple(torch.cat([b[j] for b in self.batches]) for j in range(len(self.batches[0])))
        try:
            _run(converted, together)
        finally:
            for handle in handles:
                handle.remove()

    def _fit_bn(self, i: int, bn: nn.Module, u: torch.Tensor) -> None:
        plan = self.plans[i]
        index = self.pair_samplers[i].index
        if not self.z_rows[i] or index is None:
            return
        z = torch.cat(self.z_rows[i])
        with torch.no_grad():
            if plan.placement == "before":  # BN -> f became f -> BN': BN' sees u = f(z) of this model
                target = plan.f(plan.a[None, :] * z + plan.b[None, :]).double()
                if plan.post is not None:
                    target = plan.post[0][None, :] * target + plan.post[1][None, :]
            else:  # f -> BN became BN' -> f: BN' sees this model's z
                target = plan.a[None, :] * plan.f(z.clone()).double() + plan.b[None, :]
        current = _rows(u.detach())[index.to(u.device)].double().cpu()
        w = torch.full((len(current),), 1.0 / len(current), dtype=torch.float64)
        with torch.no_grad():
            if plan.placement == "before":
                a2, b2, mean, var = fit_math.fit_after(lambda t: t, current, w, target)
                effect = fit_math.relative_rmse(a2[None, :] * current + b2[None, :], target, w)
            else:
                with torch.enable_grad():  # Levenberg–Marquardt differentiates f; the pass runs without grad
                    a2, b2 = fit_math.fit_before(plan.f, current, w, target, plan.init or (plan.a, plan.b))
                mean, var = fit_math.weighted_moments(current, w)
                effect = fit_math.relative_rmse(
                    plan.f(a2[None, :] * current + b2[None, :]).double(), target, w
                )
            weight, bias = fit_math.bn_params_for_affine(a2, b2, mean, var, plan.eps)
            for name, value in (
                ("weight", weight),
                ("bias", bias),
                ("running_mean", mean),
                ("running_var", var),
            ):
                tensor = getattr(bn, name)
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
        self.effects[i] = effect
        self.notes[i].append(f"{self.source} fit: block error {effect:.3f} (relative RMS)")

    def _refit(self, i: int, layer: nn.Module, x: torch.Tensor) -> None:
        plan = self.plans[i]
        sampler = self.refit_samplers[i]
        assert sampler.index is not None and plan.refit is not None
        target = torch.cat(self.targets[i])
        what = "output"
        current = self.current_streams.pop(i, None)
        if current is not None and current.shape == target.shape:
            # layer + stream must give the original's sum: target = original layer + original stream - this stream
            target = target + torch.cat(self.streams[i]) - current
            what = "residual sum"
        equations = NormalEquations(layer)
        equations.add_rows(_design_rows(layer, x.detach(), sampler.index), target)
        try:
            error = equations.solve()
        except Underdetermined as why:
            self.notes[i].append(
                f"{plan.refit} not refitted: {why} (the fit would follow the samples, not the data)"
            )
            return
        self.notes[i].append(f"refitted {plan.refit} to the original's {what} (relative error {error:.3f})")

    def fits(self) -> list[PairFit]:
        """Each plan's fit, in the order of the plans (after `converted_pass`)."""
        return [PairFit(effect, tuple(notes)) for effect, notes in zip(self.effects, self.notes, strict=True)]


def _design_rows(layer: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The layer's design rows (im2col for convs) at the output positions ``index`` (sample-major),
    unfolded a few samples at a time."""
    parts = []
    chunk = 16
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk]
        rows, _ = design_rows(layer, part.double())
        lo = start * (len(rows) // len(part))  # rows per sample: output positions (tokens for a Linear)
        local = index[(index >= lo) & (index < lo + len(rows))] - lo
        parts.append(rows[local.to(rows.device)].cpu())
    return torch.cat(parts)


def _stream_hook(model: nn.Module, stream: tuple[str, str, int], keep: Callable[[Any], None]) -> Any:
    name, side, position = stream
    module = model.get_submodule(name)
    if side == "input":
        return module.register_forward_pre_hook(
            lambda m, args: keep(args[position]) if len(args) > position else None
        )
    return module.register_forward_hook(lambda m, args, out: keep(out))


def _run(model: nn.Module, batch: Batch) -> None:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, tuple(t.to(device) for t in batch))
    except Exception as exc:
        raise ModelRunError(f"the model failed on the calibration data: {type(exc).__name__}: {exc}") from exc


__all__ = ["ROWS", "PairFit", "PairInput", "PairPlan", "SequentialCalibration"]

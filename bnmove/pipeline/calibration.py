"""Stage 4, *calibrate*: the fits of a conversion made again on data, and how far the result moved.

`Calibrator` plans, for each fitted pair, what the two calibration
passes of `bnmove.fitting.sequential` need (the module hook that sees the
pair's input, its new BN, the layer to refit after it) and runs the passes on
the converted model; `calibration_check` measures the converted model
against the original on calibration samples.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch
from torch import fx, nn

from ..analysis.batchnorms import is_batchnorm_module
from ..analysis.detect import Site
from ..analysis.nodes import skip_identity_down
from ..analysis.patterns import match_activation, module_activation_spec
from ..analysis.tracing import Region
from ..core.affine import ChannelAffine, affine_map
from ..core.clone import clone_module
from ..core.fidelity import Agreement
from ..core.modules import module_calls, qualified
from ..core.running import eval_mode, output_tensors
from ..errors import BnmoveError
from ..fitting.calibrate import Batch, call_model
from ..fitting.refit import refit_blocker
from ..fitting.sequential import PairFit, PairInput, PairPlan, SequentialCalibration
from ..fitting.synthetic import synthesize_inputs
from ..rules import KeptAffine, Method, pair_activation
from ..rules.base import CalibrationSource
from .plan import check_choice
from .results import CalibrationCheck, Move, Progress

#: how pairs are fitted without calibration data
#: how a fit without data gets its samples: Gaussians from each BN's statistics, or synthetic inputs
DataFree = Literal["gaussian", "synthetic"]
DATA_FREE: tuple[DataFree, ...] = get_args(DataFree)


@dataclass(frozen=True)
class Calibration:
    """Where a conversion's fits get their samples (``convert(..., calibration=Calibration(x))``).

    Args:
        data: real inputs (a tensor, a sequence of tensors or tuples, arrays, a DataLoader, a
            file or folder the CLI reads): pair by pair in graph order, each fit is fed by the
            already converted upstream model. Without it, fits are data-free.
        samples: use at most this many samples (and make as many, with ``data_free="synthetic"``).
        refit_next: with data, also refit the Conv/Linear after each fitted pair (ridge least
            squares against the original's output there).
        data_free: without data, ``"gaussian"`` (per channel, from each BN's own running
            statistics; instant) or ``"synthetic"`` (inputs optimised until every BN's batch
            statistics match its running statistics, see
            [`bnmove.fitting.synthetic.synthesize_inputs`][bnmove.fitting.synthetic.synthesize_inputs], then fitted like data; seconds to
            minutes, far closer to the original; they take the shape of the example inputs).
    """

    data: Any = None
    samples: int = 256
    refit_next: bool = True
    data_free: DataFree = "gaussian"

    def __post_init__(self) -> None:
        check_choice("data-free fitting", self.data_free, DATA_FREE)
        if self.data is not None and self.data_free == "synthetic":
            raise BnmoveError("give calibration data or ask for synthetic data-free fitting, not both")
        if self.samples < 1:
            raise BnmoveError(f"calibration samples must be at least 1, got {self.samples}")


@dataclass(frozen=True)
class SyntheticRequest:
    """A request for synthetic calibration inputs, made only if some pair is fitted."""

    samples: int

    def batches(
        self, model: nn.Module, inputs: Sequence[torch.Tensor] | None, progress: Progress
    ) -> list[Batch]:
        x = synthesize_inputs(
            model,
            inputs,
            samples=self.samples,
            on_progress=lambda stage: progress(stage.what, stage.done or 0, stage.total),
        )
        return [(x,)]


class Calibrator:
    """Calibrated fitting in two passes by module hooks (`bnmove.fitting.sequential`)."""

    def __init__(self, regions: dict[str, Region], refit_next: bool, source: CalibrationSource) -> None:
        self.regions = regions
        self.refit = refit_next
        self.source = source  # "calibrated" (the user's data) or "synthetic"
        self.calls = {prefix: module_calls(region.graph) for prefix, region in regions.items()}

    def read(self, site: Site) -> PairInput | None:
        """What the passes need from the original for one pair, read before its move (None: it
        stays data-free)."""
        calls = self.calls[site.region]
        tap = _pair_input(site, calls)
        if tap is None or site.bn_node.op != "call_module":
            return None
        root = self.regions[site.region].root
        bn = root.get_submodule(str(site.bn_node.target))
        f = pair_activation(root, site)
        if f is None or getattr(bn, "running_mean", None) is None:
            return None
        a, b = (t.cpu() for t in affine_map(bn))
        name, output = tap
        return PairInput(
            tap=qualified(site.region, name),
            tap_output=output,
            placement=str(site.pair.placement),
            f=f,
            a=a,
            b=b,
            eps=float(bn.eps),  # type: ignore[arg-type]
        )

    def read_absorb(self, site: Site, kept: KeptAffine) -> PairInput | None:
        """What the passes need to fit a kept affine into the pair's BN (read before it is absorbed):
        ``A → f → BN′`` is a ``BN → f`` pair whose target BN′ maps; ``BN′ → f → A`` an ``f → BN``
        pair read at BN′'s output, whose fit starts from BN′'s map."""
        calls = self.calls[site.region]
        root = self.regions[site.region].root
        bn_name = str(site.bn_node.target)
        tap = kept.name if kept.side == "before" else bn_name
        f = pair_activation(root, site)
        if f is None or calls.get(tap, 0) != 1 or calls.get(bn_name, 0) != 1:
            return None
        affine = root.get_submodule(kept.name)
        assert isinstance(affine, ChannelAffine)
        bn = root.get_submodule(bn_name)
        a, b = (t.detach().double().cpu() for t in (affine.weight, affine.bias))
        own = tuple(t.cpu() for t in affine_map(bn))
        return PairInput(
            tap=qualified(site.region, tap),
            tap_output=kept.side == "after",
            placement="before" if kept.side == "before" else "after",
            f=f,
            a=a,
            b=b,
            eps=float(bn.eps),  # type: ignore[arg-type]
            post=own if kept.side == "before" else None,  # type: ignore[arg-type]
            init=own if kept.side == "after" else None,  # type: ignore[arg-type]
        )

    def plan(
        self, read: PairInput, bn: str, site: Site, modules: dict[str, nn.Module], out: fx.Node | None = None
    ) -> PairPlan:
        """The pair's plan, once it has moved and its BN′ is at ``bn``: what was read, and the
        Conv/Linear fed by the pair (by ``out``, where given) if it can be refitted, and, when that
        layer's output is added to a residual stream, where the stream is read (its error upstream
        is then cancelled by the refit too)."""
        refit, stream = self._refit_target(site, modules, out) if self.refit else (None, None)
        return PairPlan(**read.fields(), bn=bn, refit=refit, stream=stream)

    def _refit_target(
        self, site: Site, modules: dict[str, nn.Module], out: fx.Node | None
    ) -> tuple[str | None, tuple[str, str, int] | None]:
        if out is None:
            if site.pair.placement == "before" or site.act_node is None:
                out = site.bn_node  # its slot now ends the pair: act then BN' (fused: the whole module)
            else:
                out = skip_identity_down(site.act_node, modules)
        user = _next_affine(out, modules)
        if user is None or refit_blocker(modules[str(user.target)]) is not None:
            return None, None
        calls = self.calls[site.region]
        if calls[str(user.target)] > 1:
            return None, None
        refit = qualified(site.region, user.target)
        partner = _residual_partner(user)
        if partner is None:
            return refit, None
        other = partner[1]
        if other.op == "placeholder":  # the stream enters this region: its root's argument
            placeholders = [n for n in self.regions[site.region].graph.nodes if n.op == "placeholder"]
            return refit, (site.region, "input", placeholders.index(other))
        if other.op == "call_module" and calls.get(str(other.target), 0) == 1:
            return refit, (qualified(site.region, other.target), "output", 0)
        return refit, None

    def run(
        self,
        model: nn.Module,
        converted: nn.Module,
        plans: list[PairPlan],
        batches: list[Batch],
        progress: Progress,
    ) -> list[PairFit]:
        """Both passes; each plan's fit, in the order of ``plans``."""
        # A BN' that is not a torch BatchNorm of its own (inside a fused module) has no hook to fit
        # it by: its pair keeps the Gaussian fit, and says so (``finish`` leaves it as it is).
        hookable = [
            i
            for i, p in enumerate(plans)
            if isinstance(converted.get_submodule(p.bn), nn.modules.batchnorm._BatchNorm)
        ]
        fits = [PairFit(None, ()) for _ in plans]
        if not hookable:
            return fits
        passes = SequentialCalibration([plans[i] for i in hookable], batches, self.source)
        done = [0]
        total = len(batches) + 1

        def step() -> None:
            done[0] += 1
            progress("calibrating: original model", done[0], total)

        original = clone_module(model)  # hooks and passes never touch the user's model
        passes.original_pass(original, on_batch=step)
        progress("calibrating: fitting in order", total - 1, total)
        passes.converted_pass(converted)
        progress("calibrating: fitting in order", total, total)
        for i, fit in zip(hookable, passes.fits(), strict=True):
            fits[i] = fit
        return fits

    def finish(self, pending: Pending, fit: PairFit) -> Move:
        """The pair's move with the calibrated fit's method, error and notes, where the passes
        fitted it; else with its data-free fit, and why it is not calibrated."""
        move = pending.move
        if fit.effect is None:
            return replace(move, notes=(*pending.data_free, *move.notes, NOT_CALIBRATED))
        return replace(
            move, method=Method.fitted_on(self.source), effect=fit.effect, notes=(*fit.notes, *move.notes)
        )


@dataclass(frozen=True)
class Pending:
    """A move made, waiting for calibration: ``move`` without the data-free fit's notes, which
    ``data_free`` holds (they stay where the passes cannot fit the pair), and the pair's plan."""

    move: Move
    plan: PairPlan | None = None
    data_free: tuple[str, ...] = ()


#: why a pair fitted while calibration data was given still holds a Gaussian fit
NOT_CALIBRATED = (
    "fitted from Gaussian statistics, not the calibration data: no module hook reaches this pair's "
    "input or its new BN (a function, a module called at several places, or a fused module)"
)


def _pair_input(site: Site, calls: dict[str, int]) -> tuple[str, bool] | None:
    """``(module, is_output)``: the module hook that sees the pair's input in the original: the
    BN's input for ``BN -> f`` (and fused modules), the activation's input for ``f -> BN`` (its
    module's, or the output of the module feeding a functional one). None if no module called
    once carries it."""
    if site.pair.placement == "before" or site.act_node is None:
        node, output = site.bn_node, False
    else:
        node, output = site.act_node, False
        if node.op != "call_module" or calls.get(str(node.target), 0) > 1:
            source = node.args[0] if node.args else None
            if not isinstance(source, fx.Node):
                return None
            node, output = source, True
    if node.op != "call_module" or calls.get(str(node.target), 0) > 1:
        return None
    return str(node.target), output


_ADDS = {operator.add, operator.iadd, torch.add}


def _residual_partner(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(add, other)`` when ``node``'s only user adds it to another tensor."""
    users = list(node.users)
    if len(users) != 1:
        return None
    add = users[0]
    is_add = (add.op == "call_function" and add.target in _ADDS) or (
        add.op == "call_method" and add.target in ("add", "add_")
    )
    if not is_add or len(add.args) != 2 or add.kwargs:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(other, fx.Node) or other is node:
        return None
    return add, other


def _next_affine(node: fx.Node, modules: dict[str, nn.Module], hops: int = 6) -> fx.Node | None:
    """The first Conv/Linear fed (through single-user pooling, flatten, identity...) by ``node``."""
    for _ in range(hops):
        users = list(node.users)
        if len(users) != 1:
            return None
        (node,) = users
        if node.op == "call_module":
            module = modules.get(str(node.target))
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                return node
            if module is None or is_batchnorm_module(module) or module_activation_spec(module) is not None:
                return None
        elif node.op not in ("call_function", "call_method") or match_activation(node, modules) is not None:
            return None
        if any(isinstance(a, fx.Node) for a in node.args[1:]):
            return None  # combines with another tensor (add, cat...): not a pass-through
    return None


def calibration_check(model: nn.Module, converted: nn.Module, batches: list[Batch]) -> CalibrationCheck:
    meter = Agreement()
    with eval_mode(model), eval_mode(converted), torch.no_grad():
        for batch in batches:
            meter.add(output_tensors(call_model(model, batch)), output_tensors(call_model(converted, batch)))
    measured = meter.result()
    return CalibrationCheck(sum(len(b[0]) for b in batches), measured.max_abs, measured.top1, measured.rel)

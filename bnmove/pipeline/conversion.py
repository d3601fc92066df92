"""``convert``: move every movable BatchNorm to one side of its activation.

Flow: copy -> analysis graph (fx trace, else a recorded forward pass) ->
detect -> for each pair: parameters (exact | fit | swap) and structure (module
surgery, else graph surgery of the one forward that calls both) -> verify
against the original in eval mode. The copy is returned: the user's class,
attributes, hooks and forward code, with only the moved modules changed. The
input model is never modified.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import fx, nn

from ..analysis.detect import PLACEMENTS, Pair, Site, has_uninitialized_lazy
from ..analysis.inputs import infer_example_inputs
from ..analysis.patterns import (
    is_batchnorm_module,
    match_activation,
    module_activation_spec,
    skip_identity_down,
)
from ..analysis.tracing import Region, Untraced
from ..core.affine import ChannelAffine
from ..core.clone import clone_module
from ..core.fidelity import Agreement, Deviation, compare_models, tolerance_for
from ..core.gc_pause import paused_gc
from ..core.running import double_inputs, eval_mode, output_tensors
from ..errors import BnmoveError, VerificationError
from ..fitting.calibrate import (
    Batch,
    calibration_batches,
    call_model,
    refit_blocker,
    split_held_out,
)
from ..fitting.sequential import PairPlan, SequentialCalibration
from ..fitting.synthetic import synthesize_inputs
from ..moving import rewrite
from ..moving.absorb import KeptAffine, absorb, kept_affine_of
from .analyse import analyse

log = logging.getLogger(__name__)

Method = Literal["auto", "exact", "fit", "swap"]
METHODS: tuple[str, ...] = ("auto", "exact", "fit", "swap")
#: how pairs are fitted without calibration data
DATA_FREE: tuple[str, ...] = ("gaussian", "synthetic")


@dataclass(frozen=True)
class Move:
    """What happened to one pair."""

    pair: Pair
    moved: bool
    #: "exact" (BN folded into a neighbour, eval outputs kept); "exact-kept-affine" (the BN's
    #: eval-mode affine kept as a ChannelAffine layer, eval outputs kept); "fit-data-free" / "fit-calibrated" / "fit-synthetic"
    #: (BN' fitted to reproduce the block from Gaussian inputs / real data / synthetic
    #: inputs); "swap" (reordered, parameters untouched); None if not moved
    method: str | None
    reason: str | None = None
    notes: tuple[str, ...] = ()
    #: the fitted block's relative RMS error on the fitting samples (fits only)
    effect: float | None = None
    #: where the BN is in the converted model (``<bn>.1`` or ``<bn>.0`` when its slot
    #: became ``Sequential(act, bn)`` / ``Sequential(bn, act)``); None if not moved
    moved_to: str | None = None
    #: the kept affine (of an earlier exact move) this pair's BN absorbed by fitting; the pair
    #: itself stays where it is (``fit`` on a converted model)
    absorbed: str | None = None

    @property
    def keeps_outputs(self) -> bool:
        return (not self.moved and self.absorbed is None) or (self.method or "").startswith("exact")

    def to_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair.to_dict(),
            "moved": self.moved,
            "method": self.method,
            "keeps_outputs": self.keeps_outputs,
            "reason": self.reason,
            "notes": list(self.notes),
            "effect": self.effect,
            "moved_to": self.moved_to,
            "absorbed": self.absorbed,
        }


@dataclass(frozen=True)
class CalibrationCheck:
    """The converted model against the original on part of the calibration data (eval mode)."""

    samples: int
    max_abs_error: float
    #: fraction of samples with the same argmax, when outputs look like class scores
    top1_agreement: float | None
    #: max abs error relative to the original's largest |output| on these samples
    max_rel_error: float = 0.0


@dataclass
class Conversion:
    """The converted model, one :class:`Move` per pair, and the verification."""

    model: nn.Module
    placement: str
    method: str
    moves: list[Move]
    verification: Deviation | None
    untraced: list[Untraced] = field(default_factory=list)
    #: end-to-end agreement with the original on the calibration samples the fits used
    calibration: CalibrationCheck | None = None
    #: the same on the calibration samples held out of every fit: the figure to trust
    held_out: CalibrationCheck | None = None
    #: what a user must hear about this conversion (the CLI prints them on stderr)
    warnings: list[str] = field(default_factory=list)

    @property
    def moved(self) -> list[Move]:
        return [m for m in self.moves if m.moved]

    @property
    def absorbed(self) -> list[Move]:
        """Pairs whose BN absorbed a kept affine by fitting (they stay where they are)."""
        return [m for m in self.moves if m.absorbed is not None]

    @property
    def changed_function(self) -> list[Move]:
        """Moves that change the model's eval-mode function (swaps, fits, absorbed affines)."""
        return [m for m in self.moves if (m.moved or m.absorbed) and not m.keeps_outputs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "placement": self.placement,
            "method": self.method,
            "moved": len(self.moved),
            "moved_exact": sum(1 for m in self.moved if m.keeps_outputs),
            "moved_kept_affine": sum(1 for m in self.moved if m.method == "exact-kept-affine"),
            "moved_swap": sum(1 for m in self.moved if m.method == "swap"),
            "moved_fit": sum(1 for m in self.moved if (m.method or "").startswith("fit")),
            "absorbed_affines": len(self.absorbed),
            "moves": [m.to_dict() for m in self.moves],
            "verification": self.verification.to_dict() if self.verification else None,
            "untraced": [u.__dict__ for u in self.untraced],
            "calibration": self.calibration.__dict__ if self.calibration else None,
            "held_out": self.held_out.__dict__ if self.held_out else None,
            "warnings": list(self.warnings),
        }


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise BnmoveError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _plan(site: Site, placement: str, method: str, taken: set[fx.Node]) -> tuple[str | None, str | None]:
    """Which method moves this site, or why it stays (None, reason)."""
    pair = site.pair
    if pair.placement is None:
        return None, pair.reason
    if pair.placement == placement:
        return None, f"already {placement} the activation"
    if not pair.movable:
        return None, pair.reason
    if site.bn_node in taken or site.act_node in taken:
        return None, "its BatchNorm or activation already moved with another pair"
    if method == "swap":
        return "swap", None
    if method == "fit":
        return "fit", None
    if pair.exact:
        return "exact", None
    if method == "exact":
        return None, f"no exact move: {pair.reason}"
    return "fit", None


def convert(
    model: nn.Module,
    placement: str,
    *,
    method: str = "auto",
    example_inputs: Sequence[torch.Tensor] | None = None,
    verify: bool = True,
    calibration_data: Any = None,
    calibration_samples: int = 256,
    refit_next: bool = True,
    data_free: str = "gaussian",
    on_progress: Callable[[int, int], None] | None = None,
    max_error: float | None = None,
) -> Conversion:
    """Move every movable BatchNorm ``placement`` (``"before"``/``"after"``) its activation.

    Args:
        model: the model to convert; it is copied, never modified.
        placement: ``"before"`` (BN -> f) or ``"after"`` (f -> BN).
        method: ``"exact"`` keeps eval outputs: the BN is folded into the
            neighbouring Conv/Linear, or where none absorbs it its eval-mode
            affine map is kept as a :class:`~bnmove.core.affine.ChannelAffine`
            layer; an identity BN with real statistics goes to the other side.
            Only a BN without running statistics has no exact move.
            ``"fit"`` moves every pair and fits the new BN so the block
            reproduces the old one, with no extra layer; ``"swap"`` reorders
            and leaves parameters untouched; ``"auto"`` is exact where possible
            and fit elsewhere (swap only where fitting is impossible).
        example_inputs: inputs for the verification run; inferred from the
            first layer when not given.
        verify: compare original and converted outputs in eval mode.
        calibration_data: real inputs (a tensor, a sequence of tensors or
            tuples, a DataLoader) for fitting: pair by pair in graph order, each
            fed by the already converted upstream model. Without it, fits are
            data-free (Gaussian inputs from the BN's own statistics).
        calibration_samples: at most this many calibration samples are used
            (and made, with ``data_free="synthetic"``).
        refit_next: with calibration data, also re-fit the Conv/Linear after each
            fitted pair (ridge least squares against the original's output there).
        data_free: how to fit without calibration data: ``"gaussian"``
            (per channel, from each BN's own running statistics; instant) or
            ``"synthetic"`` (inputs optimised until every BN's batch statistics
            match its running statistics, see :func:`synthesize_inputs`, then
            fitted like calibration data; seconds to minutes, far closer to the
            original). Synthetic inputs take the shape of ``example_inputs``.
        on_progress: called with ``(done, total)`` while synthetic inputs are made.
        max_error: when the conversion changes the function (fit, swap), raise
            :class:`BnmoveError` if its relative output error exceeds this: on
            the held-out calibration samples when there are any, else on the
            verification inputs. Without it a large change adds a line to
            ``Conversion.warnings`` that names the pairs that changed it most.

    Returns:
        A :class:`Conversion`; with ``method="exact"`` a deviation above float
        tolerance raises :class:`VerificationError` instead.

    Example:
        >>> result = convert(model, "after", method="exact")
        >>> result.verification.max_abs_error   # ~1e-6
    """
    _check_choice("data-free fitting", data_free, DATA_FREE)
    batches = None
    if calibration_data is not None:
        if data_free == "synthetic":
            raise BnmoveError("give calibration data or ask for synthetic data-free fitting, not both")
        batches = calibration_batches(calibration_data, samples=calibration_samples)
    synthetic = _Synthetic(calibration_samples, on_progress) if data_free == "synthetic" else None
    with paused_gc():
        result = _convert(
            model, placement, method, example_inputs, verify, batches, refit_next, synthetic, on_progress
        )
    _judge_fidelity(result, max_error)
    return result


#: above this relative output error (or below this top-1 agreement) a changed function is warned about
WARN_REL_ERROR = 0.05
WARN_TOP1 = 0.99


def _judge_fidelity(result: Conversion, max_error: float | None) -> None:
    """Refuse (``max_error``) or warn about a conversion whose outputs moved, on the most honest data."""
    changed = result.changed_function
    if not changed:
        return
    check = result.held_out
    if check is not None:
        where, rel, top1 = (
            f"{check.samples} held-out calibration samples",
            check.max_rel_error,
            check.top1_agreement,
        )
    elif result.verification is not None:
        shapes = ", ".join("x".join(map(str, s)) for s in result.verification.input_shapes)
        where, rel, top1 = f"the example input {shapes}", result.verification.max_rel_error, None
    else:
        return
    worst = sorted(changed, key=lambda m: -(m.effect if m.effect is not None else float("inf")))[:3]
    names = ", ".join(
        f"{m.pair.bn} ({m.method}" + (f", block error {m.effect:.2f})" if m.effect is not None else ")")
        for m in worst
    )
    agree = f", top-1 agreement {top1:.1%}" if top1 is not None else ""
    if max_error is not None and rel > max_error:
        raise BnmoveError(
            f"the conversion changes outputs by {rel:.3g} relative on {where}{agree}, above --max-error "
            f"{max_error:g}; the pairs that changed them most: {names}"
        )
    if max_error is None and (rel > WARN_REL_ERROR or (top1 is not None and top1 < WARN_TOP1)):
        message = (
            f"the converted model computes something else: relative output error {rel:.3g} on {where}"
            f"{agree}; the pairs that changed it most: {names}"
        )
        result.warnings.append(message)  # the CLI prints these; API users read them here
        log.info(message)


@dataclass(frozen=True)
class _Synthetic:
    """A request for synthetic calibration inputs, made only if some pair is fitted."""

    samples: int
    on_progress: Callable[[int, int], None] | None

    def batches(self, model: nn.Module, inputs: Sequence[torch.Tensor] | None) -> list[Batch]:
        x = synthesize_inputs(model, inputs, samples=self.samples, on_step=self.on_progress)
        return [(x,)]


def _convert(
    model: nn.Module,
    placement: str,
    method: str,
    example_inputs: Sequence[torch.Tensor] | None,
    verify: bool,
    batches: list[Batch] | None = None,
    refit_next: bool = True,
    synthetic: _Synthetic | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Conversion:
    _check_choice("placement", placement, PLACEMENTS)
    _check_choice("method", method, METHODS)
    if has_uninitialized_lazy(model):
        raise BnmoveError("the model has lazy layers that are not initialised; run one forward pass first")
    work = clone_module(model)
    analysis = analyse(work, example_inputs)
    traced, sites, mover = analysis.traced, analysis.sites, analysis.mover
    inputs: tuple[Any, ...] | None = tuple(example_inputs) if example_inputs is not None else None
    whole = traced.regions.get("")
    runnable = whole is not None and not whole.recorded
    if inputs is None and verify:
        inputs = infer_example_inputs(model, whole.graph if runnable and whole else None)

    source = "calibrated"
    if synthetic is not None and any(_plan(site, placement, method, set())[0] == "fit" for site in sites):
        if runnable:
            batches, source = synthetic.batches(model, inputs), "synthetic"
        else:
            log.warning("synthetic fitting needs a model that traces whole; fitting from Gaussian statistics")
    calibrator = None
    held: list[Batch] = []
    if batches is not None and source != "synthetic":
        batches, held = split_held_out(batches)
    if batches is not None:
        calibrator = _Calibrator(traced.regions, refit_next, source)

    pending: list[tuple[Move, PairPlan | None]] = []
    taken: set[fx.Node] = set()
    for site in sites:
        chosen, reason = _plan(site, placement, method, taken)
        kept = None
        if chosen is None and method == "fit" and site.pair.placement == placement:
            kept = kept_affine_of(site, mover.modules(site.region))
        if chosen is None and kept is not None:  # a kept affine next to it: fit it away
            plan = calibrator.plan_absorb(site, kept) if calibrator else None
            try:
                said, error = absorb(traced.regions[site.region].root, site, kept)
            except rewrite.CannotFit as refused:
                pending.append(
                    (Move(site.pair, False, None, f"{reason}; kept affine stays: {refused}"), None)
                )
                continue
            mover.forget(site.region)
            if plan is not None:  # the block now ends at BN″ (A → f → BN′) or where A was (BN′ → f → A)
                end = site.bn_node if kept.side == "before" else kept.node
                calibrator.plan_refit(plan, site, mover.modules(site.region), out=end)  # type: ignore[union-attr]
            elif calibrator is not None:
                said.append(_NOT_CALIBRATED)
            taken.update(n for n in (site.bn_node, site.act_node) if n is not None)
            move = Move(site.pair, False, "fit-data-free", reason, tuple(said), error, absorbed=kept.name)
            pending.append((move, plan))
            continue
        if chosen is None:
            pending.append((Move(site.pair, False, None, reason), None))
            continue
        structure = analysis.structure(site)
        assert structure is not None  # a movable pair has one (analyse)
        root = traced.regions[site.region].root
        # A fit starts from Gaussian statistics; with data, the passes below fit it again.
        plan = calibrator.plan(site) if calibrator and chosen == "fit" else None
        used, notes, effect, affine = rewrite.adjust(root, site, chosen, None)
        more, moved_to = mover.apply(site, structure, affine)
        notes.extend(more)
        if plan is not None and used == "fit-data-free" and moved_to is not None:
            plan.bn = moved_to
            calibrator.plan_refit(plan, site, mover.modules(site.region))  # type: ignore[union-attr]
        else:
            if calibrator is not None and used == "fit-data-free":
                notes.append(_NOT_CALIBRATED)
            plan = None
        taken.update(n for n in (site.bn_node, site.act_node) if n is not None)
        why = site.pair.reason if used != "exact" and method in ("auto", "exact") else None
        pending.append((Move(site.pair, True, used, why, tuple(notes), effect, moved_to), plan))
    mover.install()
    converted = work
    if calibrator is not None:
        assert batches is not None
        plans = [plan for _, plan in pending if plan is not None]
        calibrator.run(model, converted, plans, batches, on_progress if source != "synthetic" else None)
    moves = [calibrator.finish(move, plan) if calibrator and plan else move for move, plan in pending]

    deviation = None
    if verify and inputs is not None:
        deviation = compare_models(model, converted, inputs)
        claimed_exact = all(m.keeps_outputs for m in moves)
        if (
            claimed_exact
            and not deviation.within_tolerance
            and deviation.tolerance > tolerance_for(torch.float64)
        ):
            # Some deep random nets amplify float32 rounding past any fixed tolerance. The same
            # conversion made on a float64 copy agrees to ~1e-11 when it is exact; a wrong one does not.
            high = clone_module(model).double()
            wide = double_inputs(inputs)
            again = _convert(high, placement, method, wide, verify=False)
            deviation = replace(
                deviation, float64_rel_error=compare_models(high, again.model, wide).max_rel_error
            )
        if claimed_exact and not deviation.within_tolerance:
            raise VerificationError(
                f"exact conversion changed outputs: max abs error {deviation.max_abs_error:.3g} "
                f"(relative {deviation.max_rel_error:.3g} > {deviation.tolerance:g}"
                + (
                    f"; {deviation.float64_rel_error:.3g} in float64"
                    if deviation.float64_rel_error is not None
                    else ""
                )
                + "); please report this model"
            )
    # Agreement on synthetic inputs says little about real data (they sit near decision
    # boundaries), so only the user's own calibration data is checked end to end.
    real = batches is not None and source != "synthetic"
    check = _calibration_check(model, converted, batches) if real and batches else None
    held_check = _calibration_check(model, converted, held) if real and held else None
    log.info("moved %d of %d pairs", sum(m.moved for m in moves), len(moves))
    return Conversion(converted, placement, method, moves, deviation, traced.untraced, check, held_check)


class _Calibrator:
    """Calibrated fitting in two passes by module hooks (:mod:`bnmove.fitting.sequential`)."""

    def __init__(self, regions: dict[str, Region], refit_next: bool, source: str) -> None:
        self.regions = regions
        self.refit = refit_next
        self.source = source  # "calibrated" (the user's data) or "synthetic"
        self.calls = {prefix: module_calls(region.graph) for prefix, region in regions.items()}

    def plan(self, site: Site) -> PairPlan | None:
        """What the passes need for one pair, read before its move (None: it stays data-free)."""
        calls = self.calls[site.region]
        tap = _pair_input(site, calls)
        if tap is None or site.bn_node.op != "call_module":
            return None
        root = self.regions[site.region].root
        bn = root.get_submodule(str(site.bn_node.target))
        f = rewrite.pair_activation(root, site)
        if f is None or getattr(bn, "running_mean", None) is None:
            return None
        a, b = (t.cpu() for t in rewrite.affine_map(bn))
        name, output = tap
        return PairPlan(
            tap=_qualified(site.region, name),
            tap_output=output,
            bn="",
            placement=str(site.pair.placement),
            f=f,
            a=a,
            b=b,
            eps=float(bn.eps),  # type: ignore[arg-type]
        )

    def plan_absorb(self, site: Site, kept: KeptAffine) -> PairPlan | None:
        """What the passes need to fit a kept affine into the pair's BN (read before it is absorbed):
        ``A → f → BN′`` is a ``BN → f`` pair whose target BN′ maps; ``BN′ → f → A`` an ``f → BN``
        pair read at BN′'s output, whose fit starts from BN′'s map."""
        calls = self.calls[site.region]
        root = self.regions[site.region].root
        bn_name = str(site.bn_node.target)
        tap = kept.name if kept.side == "before" else bn_name
        f = rewrite.pair_activation(root, site)
        if f is None or calls.get(tap, 0) != 1 or calls.get(bn_name, 0) != 1:
            return None
        affine = root.get_submodule(kept.name)
        assert isinstance(affine, ChannelAffine)
        bn = root.get_submodule(bn_name)
        a, b = (t.detach().double().cpu() for t in (affine.weight, affine.bias))
        own = tuple(t.cpu() for t in rewrite.affine_map(bn))
        return PairPlan(
            tap=_qualified(site.region, tap),
            tap_output=kept.side == "after",
            bn=_qualified(site.region, bn_name),
            placement="before" if kept.side == "before" else "after",
            f=f,
            a=a,
            b=b,
            eps=float(bn.eps),  # type: ignore[arg-type]
            post=own if kept.side == "before" else None,  # type: ignore[arg-type]
            init=own if kept.side == "after" else None,  # type: ignore[arg-type]
        )

    def plan_refit(
        self, plan: PairPlan, site: Site, modules: dict[str, nn.Module], out: fx.Node | None = None
    ) -> None:
        """After the pair's move: the Conv/Linear fed by it (by ``out``, where given), if it can be
        refitted, and, when that layer's output is added to a residual stream, where the stream is
        read (its error upstream is then cancelled by the refit too)."""
        if not self.refit:
            return
        if out is None:
            if site.pair.placement == "before" or site.act_node is None:
                out = site.bn_node  # its slot now ends the pair: act then BN' (fused: the whole module)
            else:
                out = skip_identity_down(site.act_node, modules)
        user = _next_affine(out, modules)
        if user is None or refit_blocker(modules[str(user.target)]) is not None:
            return
        calls = self.calls[site.region]
        if calls[str(user.target)] > 1:
            return
        plan.refit = _qualified(site.region, user.target)
        partner = _residual_partner(user)
        if partner is None:
            return
        other = partner[1]
        if other.op == "placeholder":  # the stream enters this region: its root's argument
            placeholders = [n for n in self.regions[site.region].graph.nodes if n.op == "placeholder"]
            plan.stream = (site.region, "input", placeholders.index(other))
        elif other.op == "call_module" and calls.get(str(other.target), 0) == 1:
            plan.stream = (_qualified(site.region, other.target), "output", 0)

    def run(
        self,
        model: nn.Module,
        converted: nn.Module,
        plans: list[PairPlan],
        batches: list[Batch],
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        # A BN' that is not a torch BatchNorm of its own (inside a fused module) has no hook to fit
        # it by: its pair keeps the Gaussian fit, and says so (``finish`` leaves it as it is).
        hookable = [
            p for p in plans if isinstance(converted.get_submodule(p.bn), nn.modules.batchnorm._BatchNorm)
        ]
        if not hookable:
            return
        passes = SequentialCalibration(hookable, batches)
        done = [0]
        total = len(batches) + 1

        def step() -> None:
            done[0] += 1
            if on_progress is not None:
                on_progress(done[0], total)

        original = clone_module(model)  # hooks and passes never touch the user's model
        passes.original_pass(original, on_batch=step)
        passes.converted_pass(converted)
        step()

    def finish(self, move: Move, plan: PairPlan) -> Move:
        """``move`` with the calibrated fit's method, error and notes, where the passes fitted it."""
        if plan.effect is None:
            return replace(move, notes=(*move.notes, _NOT_CALIBRATED))
        kept = [n for n in move.notes if not n.startswith("data-free fit:")]
        notes = [n.replace("calibrated fit", f"{self.source} fit", 1) for n in plan.notes]
        return replace(move, method=f"fit-{self.source}", effect=plan.effect, notes=(*notes, *kept))


#: why a pair fitted while calibration data was given still holds a Gaussian fit
_NOT_CALIBRATED = (
    "fitted from Gaussian statistics, not the calibration data: no module hook reaches this pair's "
    "input or its new BN (a function, a module called at several places, or a fused module)"
)


def _qualified(region: str, name: object) -> str:
    return f"{region}.{name}" if region else str(name)


def module_calls(graph: fx.Graph) -> dict[str, int]:
    """How often each module is called in ``graph``."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


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


def _calibration_check(model: nn.Module, converted: nn.Module, batches: list[Batch]) -> CalibrationCheck:
    meter = Agreement()
    with eval_mode(model), eval_mode(converted), torch.no_grad():
        for batch in batches:
            meter.add(output_tensors(call_model(model, batch)), output_tensors(call_model(converted, batch)))
    measured = meter.result()
    return CalibrationCheck(sum(len(b[0]) for b in batches), measured.max_abs, measured.top1, measured.rel)

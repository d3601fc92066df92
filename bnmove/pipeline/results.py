"""What a conversion returns: one [`Move`][bnmove.Move] per pair, the checks, the converted model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..analysis.detect import Pair
from ..analysis.tracing import Untraced
from ..core.fidelity import Deviation
from ..rules.base import Method

#: ``(what, done, total)``: what a long conversion is doing now (``total`` None: no count)
Progress = Callable[[str, int, "int | None"], None]


def silent(what: str, done: int, total: int | None) -> None:
    """The progress callback that reports nothing."""


@dataclass(frozen=True)
class Move:
    """What happened to one pair."""

    pair: Pair
    moved: bool
    #: how (`bnmove.rules.Method`, a ``str``): "exact", "exact-kept-affine", "fit-data-free",
    #: "fit-calibrated", "fit-synthetic" or "swap"; None if not moved
    method: Method | None
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
    #: the rule that did it (`bnmove.rules`): "fold-backward", "fold-forward", "keep-affine",
    #: "fit-after", "fit-before", "swap" or "absorb"; None if nothing was done
    rule: str | None = None

    @property
    def keeps_outputs(self) -> bool:
        return (not self.moved and self.absorbed is None) or (self.method is not None and self.method.exact)

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
            "rule": self.rule,
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
    """The converted model, one [`Move`][bnmove.Move] per pair, and the verification."""

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
            "moved_kept_affine": sum(1 for m in self.moved if m.method is Method.EXACT_KEPT_AFFINE),
            "moved_swap": sum(1 for m in self.moved if m.method is Method.SWAP),
            "moved_fit": sum(1 for m in self.moved if m.method is not None and m.method.fitted),
            "absorbed_affines": len(self.absorbed),
            "moves": [m.to_dict() for m in self.moves],
            "verification": self.verification.to_dict() if self.verification else None,
            "untraced": [u.__dict__ for u in self.untraced],
            "calibration": self.calibration.__dict__ if self.calibration else None,
            "held_out": self.held_out.__dict__ if self.held_out else None,
            "warnings": list(self.warnings),
        }

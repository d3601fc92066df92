"""What a rule is: the pairs it matches, a check that applies or refuses with a reason, what it does.

Like onnxscript's rewrite rules: ``match`` is the pattern (a pair at the
placement the rule moves from), ``check`` returns a `Check` (the rule
applies, with what it found, or a reason that ``inspect`` shows), and ``apply``
changes parameters in place on the working copy. The structure that holds a
move (module slots, regenerated forwards) is `bnmove.moving.placing`'s,
for every rule alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import fx, nn

from ..analysis.detect import Placement, RegionView, Site
from ..core.affine import ChannelAffine
from ..core.choices import Choice

#: where a calibrated fit's samples came from: the user's data, or synthetic inputs
CalibrationSource = Literal["calibrated", "synthetic"]


class Method(Choice):
    """How a pair was moved: what `bnmove.Move.method` reports (a ``str``: it compares, prints and
    serialises as its value, e.g. ``"exact-kept-affine"``)."""

    #: the BN folded into a neighbouring layer; eval outputs kept
    EXACT = "exact"
    #: the BN's eval-mode affine kept as a `ChannelAffine` layer; eval outputs kept
    EXACT_KEPT_AFFINE = "exact-kept-affine"
    #: BN′ fitted to reproduce the block from Gaussian statistics
    FIT_DATA_FREE = "fit-data-free"
    #: BN′ fitted on the user's calibration data
    FIT_CALIBRATED = "fit-calibrated"
    #: BN′ fitted on synthetic inputs
    FIT_SYNTHETIC = "fit-synthetic"
    #: reordered, parameters untouched: the function changes
    SWAP = "swap"

    @property
    def exact(self) -> bool:
        """The eval-mode function is kept."""
        return self in (Method.EXACT, Method.EXACT_KEPT_AFFINE)

    @property
    def fitted(self) -> bool:
        return self in (Method.FIT_DATA_FREE, Method.FIT_CALIBRATED, Method.FIT_SYNTHETIC)

    @classmethod
    def fitted_on(cls, source: CalibrationSource) -> Method:
        """The method of a fit refitted on data from ``source``."""
        return cls.FIT_CALIBRATED if source == "calibrated" else cls.FIT_SYNTHETIC


@dataclass(frozen=True)
class KeptAffine:
    """A kept affine next to a pair's activation, on the side away from its BN (see `absorb`)."""

    node: fx.Node
    name: str  # module name in the region's root
    #: "before": ``A → f → BN′`` (the pair is f → BN′); "after": ``BN′ → f → A`` (the pair is BN′ → f)
    side: Literal["before", "after"]


@dataclass(frozen=True, eq=False)
class Prime:
    """The running statistics BN′ takes (`bnmove.rules._exact.solve_primes`), and the BN values
    they were solved from: a BN changed since then is solved again, alone."""

    given: tuple[torch.Tensor, torch.Tensor]
    mean: torch.Tensor
    var: torch.Tensor
    notes: tuple[str, ...] = ()

    def solved_from(self, given: tuple[torch.Tensor, torch.Tensor]) -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.given, given, strict=True))


@dataclass(frozen=True)
class Check:
    """A rule's answer for one site: it applies (``reason`` is None), with what it found, or why not."""

    reason: str | None = None
    #: the layers a fold goes into
    into: tuple[fx.Node, ...] = ()
    #: the kept affine an absorb takes in
    kept: KeptAffine | None = None
    #: the statistics BN′ takes, solved before apply with every BN′ of the same activation
    prime: Prime | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.reason is None


def refuse(reason: str) -> Check:
    return Check(reason=reason)


#: what a check reads of the region a site lives in (root, modules, call counts, node names); it
#: changes nothing. The analysis builds one per region and every rule reads the same.
Context = RegionView


@dataclass
class Applied:
    """What applying a rule did, for the report and for the structure that holds the move."""

    notes: list[str] = field(default_factory=list)
    #: the BN's map kept as a layer, which the structure places beside the activation
    kept: ChannelAffine | None = None
    #: a fit's relative RMS error on its samples
    error: float | None = None
    #: a fused module split: the plain BN and the activation module that replace it
    split: tuple[nn.Module, nn.Module] | None = None

    @property
    def fit_notes(self) -> tuple[str, ...]:
        """What a data-free fit says of itself (a fit refitted on data says what that fit did instead)."""
        return () if self.error is None else (f"data-free fit: block error {self.error:.3f} (relative RMS)",)


class Rule(ABC):
    """One kind of move. Subclasses state their math in the docstring."""

    #: the rule's name in plans and reports
    name: ClassVar[str]
    #: the placement a pair has when the rule moves it (None: either)
    moves: ClassVar[Placement | None] = None
    #: what `bnmove.Move.method` reports for a pair this rule moved
    method: ClassVar[Method]
    #: the eval-mode function is kept
    exact: ClassVar[bool] = False
    #: the new parameters are fitted (and refitted on calibration data)
    fits: ClassVar[bool] = False

    def match(self, site: Site) -> bool:
        """The pattern: a pair that can move, at the placement the rule moves from."""
        placement = site.pair.placement
        return placement is not None and site.pair.movable and self.moves in (None, placement)

    @abstractmethod
    def check(self, site: Site, context: Context) -> Check:
        """Whether the rule applies to a matched site, reading only."""

    @abstractmethod
    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        """Change the parameters of ``site`` in ``root`` (the region's root), given its passed check."""

    def __repr__(self) -> str:
        return f"<rule {self.name}>"

"""What became of each BatchNorm in the deployed graph: the values the manifest records."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..core.choices import Choice


class Fate(Choice):
    """What became of one BatchNorm in the deployed graph (a ``str``: manifests hold its value)."""

    #: folded into the layers it feeds (`bnmove.analysis.folds.forward_fold`, or a gate)
    FOLDED_FORWARD = "folded-forward"
    #: fused into the Conv/Linear before it, by the exporter and onnxruntime (the check is
    #: `bnmove.analysis.folds.backward_fold`, as for convert's fold-backward move)
    FUSED_BACKWARD = "fused-backward"
    #: removed: its eval-mode map is the identity, as an exact move leaves BN′
    IDENTITY = "identity"
    #: left as a layer of its own, with the reason
    STANDALONE = "standalone"


@dataclass(frozen=True)
class BnFate:
    """What happened to one BatchNorm (or kept affine) in the deployed graph, as the manifest and
    ``inspect --deploy`` show it."""

    bn: str
    fate: Fate
    into: str | None = None
    reason: str | None = None
    #: the pooling/reshape calls the fold passed through on its way to ``into``
    through: tuple[str, ...] = ()
    #: how a folded-forward BN went in: "weights" (scale and bias of ``into``) or "border-corrected"
    #: (into a zero-padded conv, plus the constant map its padding makes: see ``border.py``)
    form: str | None = None
    #: the layer before a positively homogeneous activation that took the BN's scale magnitudes
    #: (only the signs and the shift folded forward)
    scale_into: str | None = None
    #: the deployment rule that took it (`bnmove.deploy.fold_rules`); None: it stays a BN
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


IDENTITY_REASON = (
    "the identity in eval mode, to float rounding (an exact move leaves it to normalise in "
    "training): removed from the deployed graph"
)

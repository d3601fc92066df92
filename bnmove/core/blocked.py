"""What a check returns instead of its result when it cannot give one: the reason, as a value."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Blocked:
    """Why something cannot be done (a structure for a move, a fused module's split): the reason
    ``inspect`` and ``convert`` show. Returned as ``Result | Blocked`` and told apart by type."""

    reason: str

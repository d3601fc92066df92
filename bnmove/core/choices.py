"""A closed set of choices that reads as its values: compares equal to, prints as and serialises
to the string it names (``Method.SWAP == "swap"``, ``json.dumps`` gives ``"swap"``)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """The base of bnmove's typed choices (`bnmove.rules.Method`, `bnmove.deploy.folding.Fate`)."""

    def __str__(self) -> str:
        return str(self.value)

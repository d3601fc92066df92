"""Progress, one protocol for every long call: ``on_progress(event)``.

``convert``, ``export_variants``, ``compare``, ``recalibrate`` and ``experiment`` take an
``on_progress`` callable and give it one event value at a time, in order: a [`Stage`][bnmove.Stage]
(what is being done, and how far, where that can be counted), or, from ``experiment``, the
study's own events (a run started, an epoch ended, a run finished: ``bnmove.study.RunStarted``,
``EpochRecord``, ``RunFinished``). The command line renders these events; a script can log them,
draw its own bar, or ignore the kinds it does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    """Progress event: a stage of a long call began (``done`` 0 or None) or advanced."""

    #: what is being done, in a few words ("moving pairs", "exporting after", "timing batch 8")
    what: str
    #: how many of ``total`` are done; None where nothing is counted
    done: int | None = None
    #: how many there are to do; None where that is not known
    total: int | None = None


#: what every long call takes as ``on_progress``: a callable given each progress event
OnProgress = Callable[[Any], None]


def ignore(event: Any) -> None:
    """The ``on_progress`` that reports nothing."""


__all__ = ["OnProgress", "Stage", "ignore"]

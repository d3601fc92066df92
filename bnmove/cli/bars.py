"""Progress on stderr for every long command: a live bar on a terminal, one plain line per stage
elsewhere, nothing with ``--quiet``; and the study's bars (one for the study, one per run)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..core.progress import Stage
from ..study.jobs import EpochRecord
from ..study.runs import RunFinished, RunStarted
from ._common import _stderr


def _progress(quiet: bool) -> _StageProgress:
    """The progress every long command shows on stderr: on a terminal, a live bar (what, bar,
    done/total, time, time left); elsewhere (a log file, CI, ``| tee``), one plain line per stage;
    with ``quiet`` (``--quiet``, ``--json``), nothing."""
    return _StageProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=_stderr(),
        transient=True,
        disable=quiet or not sys.stderr.isatty(),
        plain=not quiet and not sys.stderr.isatty(),
    )


#: a stage line, as ``_StageProgress`` prints it where no live bar can be drawn
PROGRESS_LINE = re.compile(r"^bnmove: .+ \[\d+\.\d s\]$")


class _StageProgress(Progress):
    """rich's Progress that, where no live bar can be drawn, says each new stage in one plain line:
    ``bnmove: exporting after (1/3) [12.3 s]`` (what, how far, seconds since the display began)."""

    def __init__(self, *columns: Any, plain: bool = False, **options: Any) -> None:
        super().__init__(*columns, **options)
        self.plain = plain
        self._said: dict[TaskID, str] = {}
        self._began = time.perf_counter()

    def add_task(self, description: str, *args: Any, **options: Any) -> TaskID:
        task = super().add_task(description, *args, **options)
        self._said[task] = description  # said when work on it starts: its first new description
        return task

    def update(self, task_id: TaskID, **options: Any) -> None:
        super().update(task_id, **options)
        self._say(task_id)

    def follow(self, task_id: TaskID) -> Callable[[Any], None]:
        """An ``on_progress`` for the library's calls: each [`Stage`][bnmove.Stage] shown on the task."""

        def show(event: Any) -> None:
            if isinstance(event, Stage):
                self.update(task_id, description=event.what, completed=event.done or 0, total=event.total)

        return show

    def _say(self, task_id: TaskID) -> None:
        if not self.plain:
            return
        task = self._tasks[task_id]
        if self._said.get(task_id) == task.description:
            return
        self._said[task_id] = task.description
        count = f" ({task.completed:.0f}/{task.total:.0f})" if task.total else ""
        elapsed = time.perf_counter() - self._began
        self.console.print(
            f"bnmove: {task.description.strip()}{count} [{elapsed:.1f} s]", highlight=False, soft_wrap=True
        )


class _StudyProgress:
    """One bar for the whole study (epochs of bnmove's loop, or runs of your training) and one per
    running job."""

    def __init__(self, quiet: bool, total: int, epochs: int) -> None:
        self.progress = _progress(quiet)
        self.study = self.progress.add_task("study", total=total)
        #: steps per run: epochs of bnmove's loop; 0 for your training (the study counts runs)
        self.epochs = epochs
        self.prefix = ""
        self.running: dict[tuple[str, int], TaskID] = {}

    def __enter__(self) -> _StudyProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def on_progress(self, event: Any) -> None:
        """The study's events (a run started, an epoch ended, a run finished), as bars."""
        if isinstance(event, RunStarted):
            name = f"  {self.prefix}{event.variant} seed {event.seed} on {event.device}"
            self.running[(event.variant, event.seed)] = self.progress.add_task(
                name, total=self.epochs or None
            )
        elif isinstance(event, EpochRecord):
            self.progress.update(
                self.study,
                advance=1,
                description=f"study: {self.prefix}{event.variant} seed {event.seed} epoch {event.epoch}: "
                f"val acc {event.val_accuracy:.1%}",
            )
            task = self.running.get((event.variant, event.seed))
            if task is not None:
                self.progress.update(task, advance=1)
        elif isinstance(event, RunFinished):
            if not self.epochs:
                self.progress.update(
                    self.study,
                    advance=1,
                    description=f"study: {self.prefix}{event.variant} seed {event.seed} done",
                )
            task = self.running.pop((event.variant, event.seed), None)
            if task is not None:
                self.progress.remove_task(task)

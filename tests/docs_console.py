"""Run the ```console blocks of the README, the docs and the examples, and check what they print.

A console block is a shell session as a user types it::

    $ bnmove convert sample-models/digits_net.pt --allow-pickle --placement after
    moved 2 of 4 BN–activation pairs (2 folded exactly); …
    wrote sample-models/digits_net.after.pt

Each ``$`` command runs with bash in the document's working folder and must exit 0; the lines
below it are what it prints (stdout and stderr together, at ``COLUMNS=100``), compared line by
line, trailing spaces ignored, up to what differs from run to run:

- ``…`` stands for any text within a line, and a line holding only ``…`` for any number of lines;
- spaces and table rules (``━━━``) match at any width, as cells widen with their figures;
- a duration (``2.4 s``, ``180 ms``, ``12 µs``, ``1.5 min``) matches any duration;
- a rounding error written as a number below 1e-4 in e-notation (``1.49e-08``) matches any such
  number: the exact figure depends on the CPU's kernels, not on bnmove;
- a decimal figure matches the same figure within 1 point for a percentage (``97.2%``), within
  3 points for the bounds of a 95% interval (``95% CI -1.4 to +5.1``: percentage points of a paired
  difference over a few seeds, which the interval's t·s/√n multiplies), else within 10% or 2 units
  of its last digit (``0.322``, ``-2.9``): a few epochs of training round differently on another
  CPU's kernels or with another thread count (measured: -1.4 to +5.1 with AVX-512 and two threads,
  -0.9 to +4.7 with AVX2, -0.7 to +4.2 with one thread), a spread after ``±`` within 30% or 2
  units of its last digit (a standard deviation over three seeds: ``0.497±0.024`` read ``±0.021``
  with torch's default kernels). Whole numbers (counts, shapes) must be equal.

Progress goes to a terminal as a live bar that leaves nothing behind; the plain stage lines bnmove
prints instead when stderr is not a terminal (``bnmove: exporting after (2/3) [3.9 s]``) are left
out, so a block shows what a user at a terminal sees.

A command with no lines below it only has to succeed. ```bash blocks (installs, GPU runs) are
not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from sybil import Example
from sybil.parsers.markdown import CodeBlockParser

from bnmove.cli.bars import PROGRESS_LINE

REPO = Path(__file__).resolve().parent.parent
COLUMNS = 100
COMMAND_TIMEOUT_S = 300

_DURATION = r"\d+(?:\.\d+)?\s?(?:ms|µs|s|min)\b"
_SMALL_E = r"\d\.\d+e-(?:0[5-9]|[1-9]\d)"
_DECIMAL = r"[-+−]?\d+\.\d+%?"
_SPECIAL = re.compile(rf"(…|{_DURATION}|{_SMALL_E}|{_DECIMAL})")


def session(source: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` per ``$`` prompt; ``\\`` continues a command."""
    commands: list[tuple[str, list[str]]] = []
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if not commands:
                raise ValueError(f"console block must start with a '$ ' command, not {line!r}")
            commands[-1][1].append(line.rstrip())
            i += 1
            continue
        command = line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command += "\n" + lines[i]
        commands.append((command, []))
        i += 1
    return commands


def _value(figure: str) -> float:
    return float(figure.rstrip("%").replace("−", "-"))


#: how far a bound of a 95% interval (percentage points) may move between CPUs and thread counts
INTERVAL_SLACK = 3.0
#: how far, relatively, a spread over seeds (the figure after ``±``) may move
SPREAD_SLACK = 0.3


def _close(expected: str, actual: str, kind: str = "") -> bool:
    """``kind``: ``"interval"`` for a bound of a 95% interval, ``"spread"`` for a figure after ``±``."""
    if expected.endswith("%") != actual.endswith("%"):
        return False
    want, got = _value(expected), _value(actual)
    last_digit = 10.0 ** -len(expected.rstrip("%").split(".")[1])
    if kind == "interval":
        slack = INTERVAL_SLACK
    elif expected.endswith("%"):
        slack = 1.0
    elif kind == "spread":
        slack = max(SPREAD_SLACK * abs(want), 2 * last_digit)
    else:
        slack = max(0.1 * abs(want), 2 * last_digit)
    return abs(got - want) <= slack + 1e-12


class LinePattern:
    """One expected line: literal text, with ``…``, durations, rounding errors and figures loose."""

    def __init__(self, expected: str) -> None:
        parts, self.figures = [], []
        #: per figure: "interval" (a bound of ``95% CI -1.4 to +5.1``), "spread" (after ``±``) or ""
        self.kinds: list[str] = []
        after_ci, previous = 0, ""
        for token in _SPECIAL.split(expected):
            if "95% CI" in token:
                after_ci = 2
            if token == "…":
                parts.append(".*")
            elif re.fullmatch(_DURATION, token):
                parts.append(_DURATION)
            elif re.fullmatch(_SMALL_E, token):
                parts.append(_SMALL_E)
            elif re.fullmatch(_DECIMAL, token):
                parts.append(f"({_DECIMAL})")
                kind = "interval" if after_ci else "spread" if previous.endswith("±") else ""
                after_ci -= 1 if after_ci else 0
                self.kinds.append(kind)
                self.figures.append(token)
            else:  # a table's cells widen with their figures: padding and rules match at any width
                for piece in re.split(r"( +|[━─]+)", token):
                    if piece.startswith(" "):
                        parts.append(" +")
                    elif piece[:1] in ("━", "─"):
                        parts.append(f"[{piece[0]}]+")
                    else:
                        parts.append(re.escape(piece))
            previous = token
        self.regex = re.compile("".join(parts))

    def fits(self, line: str) -> bool:
        found = self.regex.fullmatch(line)
        return found is not None and all(
            _close(want, got, kind)
            for want, got, kind in zip(self.figures, found.groups(), self.kinds, strict=True)
        )


def matches(expected: Sequence[str], actual: Sequence[str]) -> bool:
    """Whether ``actual`` lines fit ``expected`` (a line ``…`` spans any number of lines)."""
    patterns = [None if e.strip() == "…" else LinePattern(e) for e in expected]
    memo: dict[tuple[int, int], bool] = {}

    def fit(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(patterns):
                memo[i, j] = j == len(actual)
            elif patterns[i] is None:
                memo[i, j] = fit(i + 1, j) or (j < len(actual) and fit(i, j + 1))
            else:
                pattern = patterns[i]
                assert pattern is not None
                memo[i, j] = j < len(actual) and pattern.fits(actual[j]) and fit(i + 1, j + 1)
        return memo[i, j]

    return fit(0, 0)


def first_mismatch(expected: Sequence[str], actual: Sequence[str]) -> str:
    """The first expected line a greedy walk cannot place: what a reader needs to fix the docs."""
    j, anywhere = 0, False
    for line in expected:
        if line.strip() == "…":
            anywhere = True
            continue
        pattern = LinePattern(line)
        found = next((k for k in range(j, len(actual)) if pattern.fits(actual[k])), None)
        if found is None or (found != j and not anywhere):
            near = actual[j] if j < len(actual) else "(end of output)"
            return f"docs line {line!r} not found; output there: {near!r}"
        j, anywhere = found + 1, False
    return "output goes on past the docs' last line" if j < len(actual) and not anywhere else "?"


def run_command(command: str, cwd: Path) -> tuple[int, list[str]]:
    env = dict(
        os.environ,
        COLUMNS=str(COLUMNS),
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    lines = [line.rstrip() for line in proc.stdout.splitlines() if not PROGRESS_LINE.match(line.rstrip())]
    while lines and not lines[-1]:
        lines.pop()
    return proc.returncode, lines


def _example_files(example: Example, cwd: Path) -> None:
    """An example's README runs beside a copy of the example's files, copied once per page."""
    folder = Path(example.path).parent
    if folder.parent.name == "examples" and not example.namespace.get("_example_copied"):
        for path in folder.iterdir():
            if path.is_file() and path.name != "README.md":
                shutil.copy2(path, cwd / path.name)
        example.namespace["_example_copied"] = True


def evaluate_console(example: Example) -> str | None:
    cwd = Path(example.namespace["workdir"])
    _example_files(example, cwd)
    for command, expected in session(example.parsed):
        while expected and not expected[-1]:
            expected.pop()
        code, actual = run_command(command, cwd)
        printed = "\n".join(actual)
        if code != 0:
            return f"`{command}` exited {code}:\n{printed}"
        if expected and not matches(expected, actual):
            return (
                f"`{command}` printed\n{printed}\n\nbut the docs show\n"
                + "\n".join(expected)
                + "\n\n"
                + first_mismatch(expected, actual)
            )
    return None


class ConsoleParser(CodeBlockParser):
    language = "console"

    def evaluate(self, example: Example) -> str | None:
        return evaluate_console(example)

"""What a CLI run printed on stderr, without its progress lines (printed when stderr is not a
terminal, as in these tests): what remains is what the tests check, such as one error line."""

from __future__ import annotations

from bnmove.cli.bars import PROGRESS_LINE


def messages(stderr: str) -> list[str]:
    """Every line of ``stderr`` except the stage lines of the progress display."""
    return [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]

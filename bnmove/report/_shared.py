"""What the renderings share."""

from __future__ import annotations

from ..errors import BnmoveError


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


#: below this many columns the pair and conversion tables switch to their compact form
WIDE_TABLE = 120


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib() -> None:
    """Fail early (before any work) when a plot is asked for and matplotlib is missing."""
    if not has_matplotlib():
        raise BnmoveError(
            "--plot needs matplotlib: pip install matplotlib (or the bnmove[plot] extra)"
        ) from None

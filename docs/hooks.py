"""MkDocs hook: the command-line reference is what ``bnmove COMMAND --help`` prints.

``<!-- bnmove-help -->`` in a page becomes one section per command holding its ``--help`` text,
as an 80-column terminal shows it, so the reference and the terminal are one text
(``tests/test_docs.py`` checks it against the installed ``bnmove`` script).
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- bnmove-help -->"
WIDTH = 80


def help_text(args: list[str]) -> str:
    """What ``bnmove *args --help`` prints in an 80-column terminal."""
    from click.testing import CliRunner

    from bnmove.cli import main

    # click wraps help 2 columns short of the terminal's width
    result = CliRunner().invoke(main, [*args, "--help"], prog_name="bnmove", terminal_width=WIDTH - 2)
    if result.exit_code != 0:
        raise RuntimeError(f"bnmove {' '.join(args)} --help failed: {result.output}")
    return result.output.rstrip()


def reference() -> str:
    """The reference's sections: the group's help, then each command's."""
    from bnmove.cli import main

    commands = sorted(main.commands)
    sections = ["```text\n" + help_text([]) + "\n```"]
    for name in commands:
        sections.append(f"## bnmove {name}\n\n```text\n{help_text([name])}\n```")
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown

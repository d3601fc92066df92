"""The docs cannot drift from the code: the CLI reference is ``--help``, every command's help
fits a terminal and ends with an example, every public name is documented, every example is on
the site, and the checker that runs the docs' console blocks can fail.

The docs' code blocks themselves run as tests of their own (``conftest.py`` at the root).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from docs_console import matches, session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import hooks  # noqa: E402  (docs/hooks.py: the MkDocs hook that writes the CLI reference)

COMMANDS = ["compare", "convert", "demo", "experiment", "export", "inspect", "recalibrate"]


def test_every_command_is_in_the_reference() -> None:
    from bnmove.cli import main

    assert sorted(main.commands) == COMMANDS
    assert hooks.MARKER in (ROOT / "docs/reference/cli.md").read_text()
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert "docs/hooks.py" in config["hooks"]
    reference = hooks.reference()
    for name in COMMANDS:
        assert f"## bnmove {name}\n" in reference and hooks.help_text([name]) in reference


def test_the_cli_reference_is_what_help_prints() -> None:
    """What the site shows for each command equals what bnmove prints in an 80-column terminal
    (one process runs the command line's entry point for every command, as the script does)."""
    script = (
        "import sys\n"
        "from bnmove.cli import main\n"
        f"for args in {[[], *([c] for c in COMMANDS)]!r}:\n"
        "    try:\n"
        "        main([*args, '--help'], prog_name='bnmove')\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    print('@@@', flush=True)\n"
    )
    printed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, COLUMNS="80"),
        check=True,
    ).stdout.split("@@@\n")
    assert len(printed) == len(COMMANDS) + 2
    for args, text in zip([[], *([c] for c in COMMANDS)], printed, strict=False):
        assert hooks.help_text(args) == text.rstrip(), f"bnmove {' '.join(args)} --help differs from the docs"


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_starts_with_a_summary_and_ends_with_an_example(command: str) -> None:
    text = hooks.help_text([command] if command else [])
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    summary = lines[2].strip()  # after "Usage: ..." and a blank line
    assert summary.endswith(".") and len(summary) <= 70, summary
    example = text[text.rindex("\n\n") :].strip().splitlines()
    assert re.fullmatch(r"Examples?:", example[0]), example
    assert all(line.strip().startswith("bnmove ") or line.startswith("      ") for line in example[1:])


def test_every_public_name_is_in_the_api_reference_with_a_docstring() -> None:
    import griffe

    import bnmove.deploy
    import bnmove.io
    import bnmove.study

    page = (ROOT / "docs/reference/api.md").read_text()
    package = griffe.load("bnmove", search_paths=[str(ROOT)])
    public = [f"bnmove.{n}" for n in bnmove.__all__ if n not in ("__version__", "sample_models")]
    assert (
        15 <= len(public) <= 22
    )  # a small top level (what the main calls take: ExportOptions, Stage); the rest lives in namespaces
    public += [f"bnmove.deploy.{n}" for n in bnmove.deploy.__all__ if n not in bnmove.__all__]
    public += [f"bnmove.study.{n}" for n in bnmove.study.__all__ if n not in bnmove.__all__]
    public += [f"bnmove.io.{n}" for n in bnmove.io.__all__]
    documented = re.findall(r"^::: (\S+)$", page, flags=re.M)
    assert set(public) <= set(documented), set(public) - set(documented)
    for name in documented:
        docstring = package[name.removeprefix("bnmove.")].docstring
        assert docstring is not None and docstring.value.strip(), f"{name} has no docstring"


def test_every_example_is_on_the_site_and_run_by_its_readme() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    index = (ROOT / "docs/examples/index.md").read_text()
    folders = sorted(p for p in (ROOT / "examples").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [f.name[:2] for f in folders] == [f"{i:02d}" for i in range(1, len(folders) + 1)]
    for folder in folders:
        readme = (folder / "README.md").read_text()
        assert readme.startswith(f"# {folder.name[:2]} · ")
        page = (ROOT / f"docs/examples/{folder.name}.md").read_text()
        assert f'--8<-- "examples/{folder.name}/README.md"' in page
        assert f"examples/{folder.name}.md" in config and f"({folder.name}.md)" in index
        commands = "\n".join(
            c for block in re.findall(r"```console\n(.*?)```", readme, re.S) for c, _ in session(block)
        )
        for script in folder.glob("*.py"):
            assert f'--8<-- "examples/{folder.name}/{script.name}"' in page
            assert f"python {script.name}" in commands, f"{folder.name}/README.md never runs {script.name}"


def test_the_readme_is_short() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


# --- the checker of console blocks (tests/docs_console.py) must be able to fail ---


def test_console_output_matches_up_to_what_varies_between_runs() -> None:
    assert matches(["│ before │   94.1%±1.0% │ 3.8 s │"], ["│ before │   94.6%±1.2% │ 12.1 s │"])
    assert matches(["┃ placement ┃  time ┃", "┡━━━╇━━━┩"], ["┃ placement ┃   time ┃", "┡━━━╇━━━━┩"])
    assert matches(["max abs error 1.49e-08"], ["max abs error 3.20e-07"])
    assert matches(["CI -1.4 to +5.1"], ["CI -1.3 to +5.3"])
    # a 95% interval's bounds within 3 points: the measured figures of one study under AVX-512 with
    # two threads (the docs), AVX2, and one thread
    # a spread over seeds (after ±) within 30%: the same study with torch's default kernels
    assert matches(["│ 94.5%±1.9% │ 0.497±0.024 │"], ["│ 94.7%±1.7% │ 0.495±0.021 │"])
    for other in ("-0.9 to +4.7", "-0.7 to +4.2"):
        assert matches(
            ["(after − before: 95% CI -1.4 to +5.1, 3 seeds)"], [f"(after − before: 95% CI {other}, 3 seeds)"]
        )
    assert matches(["a", "…", "z"], ["a", "b", "c", "z"]) and matches(["a", "…", "z"], ["a", "z"])
    assert matches(["moved … pairs"], ["moved 2 of 4 pairs"])


def test_console_output_that_differs_fails() -> None:
    assert not matches(["│ before │ 94.1% │"], ["│ before │ 91.6% │"])  # more than a point
    assert not matches(["loss 0.322"], ["loss 0.400"])  # more than 10%
    assert not matches(["max abs error 1.49e-08"], ["max abs error 3.20e-03"])  # not a rounding error
    assert not matches(["9 pairs"], ["8 pairs"])  # counts are exact
    assert not matches(["95% CI -1.4 to +5.1, 3 seeds"], ["95% CI -1.4 to +8.2, 3 seeds"])  # beyond 3 points
    assert not matches(["0.7 to +4.2"], ["0.7 to +5.2"])  # outside an interval: 10% or two digits
    assert not matches(["0.497±0.024"], ["0.497±0.034"])  # a spread beyond 30%
    assert not matches(["0.497±0.024"], ["0.547±0.024"])  # the mean itself: 10%
    assert not matches(["a", "z"], ["a", "b", "z"])  # a line more
    assert not matches(["a", "b"], ["a"])  # a line less
    assert not matches(["a b"], ["ab"])


def test_console_sessions_split_into_commands_and_outputs() -> None:
    parsed = session("$ bnmove a \\\n    --b c\nout 1\nout 2\n$ bnmove d\n")
    assert parsed == [("bnmove a \\\n    --b c", ["out 1", "out 2"]), ("bnmove d", [])]
    with pytest.raises(ValueError, match="must start with"):
        session("output before any command\n")


def test_the_parallel_study_example_runs_as_a_plain_script(tmp_path: Path) -> None:
    """Worker processes re-import the script that started them: the guide's example, saved as a
    file and run with python, must work as written (it once crashed with BrokenProcessPool)."""
    page = (ROOT / "docs/guide/study.md").read_text()
    block = page[page.rindex("```python\n") + len("```python\n") :]
    script = tmp_path / "study.py"
    script.write_text(block[: block.index("```")])
    assert "jobs=2" in script.read_text() and '__name__ == "__main__"' in script.read_text()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "between before and after" in done.stdout


def test_docstrings_cross_reference_in_the_syntax_the_docs_site_reads() -> None:
    """mkdocstrings shows Sphinx roles (``:func:`x` ``) raw; links are ``[`x`][bnmove.x]``, which the
    strict docs build checks resolve."""
    import re

    role = re.compile(r":(?:func|class|mod|meth|data|attr|obj|exc):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "bnmove").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if role.search(line)
    ]
    assert not found, f"Sphinx roles in docstrings: {found[:5]}"

"""Docs that cannot rot: every code block of the README, the docs and the examples' READMEs runs
under pytest (with Sybil).

```python blocks run in one namespace per page, as ``__main__``; ```console blocks run each ``$``
command and compare what it prints (see ``tests/docs_console.py``). Every page runs in a fresh
folder holding ``sample-models/`` (what ``python -m samples.make_models`` writes), and an example's
README runs in a copy of its folder, so the paths work as a user would type them and nothing is
written into the checkout. ``<!-- skip: next if(missing("timm"), reason="needs timm") -->`` before
a block skips it where a third-party library is not installed (as in CI); the thirdparty
environment (``../shared/tools/thirdparty-venv.sh``) runs them. ``if(not long_docs, …)`` marks
the few blocks that take half a minute or more and repeat what a test already checks; they run
with ``BNMOVE_LONG_DOCS=1``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "tests"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the cores: one thread each, for torch here and for the processes tests
    # start (two threads per worker would oversubscribe and spin).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

from docs_console import ConsoleParser  # noqa: E402

_samples: Path | None = None
_LONG = os.environ.get("BNMOVE_LONG_DOCS") == "1"


def _sample_models() -> Path:
    """The sample models, written once per test session."""
    global _samples
    if _samples is None:
        from samples.make_models import main as make_models

        _samples = Path(tempfile.mkdtemp(prefix="bnmove-doc-samples-"))
        make_models(["-o", str(_samples)])
    return _samples


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """The sample models go with the session that wrote them (in each xdist worker)."""
    if _samples is not None:
        shutil.rmtree(_samples, ignore_errors=True)


def _setup(namespace: dict[str, Any]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bnmove-doc-"))
    shutil.copytree(_sample_models(), workdir / "sample-models")
    namespace.update(
        workdir=workdir, __name__="__main__", _cwd=os.getcwd(), missing=_missing, long_docs=_LONG
    )
    os.chdir(workdir)


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _teardown(namespace: dict[str, Any]) -> None:
    os.chdir(namespace["_cwd"])
    shutil.rmtree(namespace["workdir"], ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), ConsoleParser(), SkipParser()],
    patterns=["README.md", "docs/*.md", "docs/*/*.md", "examples/*/README.md"],
    setup=_setup,
    teardown=_teardown,
).pytest()

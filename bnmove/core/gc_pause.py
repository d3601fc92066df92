"""Pause Python's cyclic garbage collector around graph-heavy work.

Copying a model and tracing it allocate tens of thousands of objects; each
allocation burst triggers collections that rescan the whole (growing) heap, so
their cost grows faster than the model (a third of the time at 800 blocks).
Reference counting still frees everything; the collector resumes afterwards.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

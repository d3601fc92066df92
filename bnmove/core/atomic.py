"""Atomic writes: a temporary sibling first, then one rename, so a failed run leaves nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import BnmoveError


def check_output(path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to write over an input, over an existing file without ``force``, or where nothing
    can be written (a missing folder, a file in the way, no permission, a read-only system)."""
    resolved = path.resolve()
    if any(resolved == p.resolve() for p in inputs):
        raise BnmoveError(f"{path}: refusing to overwrite the input file; choose another output with -o")
    if path.exists() and not force:
        raise BnmoveError(f"{path}: already exists; pass --force to overwrite it")
    _check_writable_folder(path, path.parent)


def check_output_folder(path: Path) -> None:
    """Refuse an output folder that cannot be made or written into, before any work starts."""
    if path.exists() and not path.is_dir():
        raise BnmoveError(f"{path}: exists and is not a folder")
    _check_writable_folder(path, path if path.is_dir() else path.parent)


def _check_writable_folder(path: Path, folder: Path) -> None:
    """``folder`` (where ``path`` goes) exists, is a folder, and takes a new entry: tried for real,
    since permissions do not tell (root may write anywhere but ``/proc``; a read-only mount)."""
    if folder.exists() and not folder.is_dir():
        raise BnmoveError(f"{path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise BnmoveError(f"{path}: folder {folder} does not exist")
    try:
        probe = tempfile.mkdtemp(prefix=".bnmove-probe-", dir=folder)
    except OSError as exc:
        raise BnmoveError(f"{path}: cannot write in {folder} ({exc.strerror or exc})") from exc
    os.rmdir(probe)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool = False) -> None:
    """The mode an ordinary write would give (temporary files are private: 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise BnmoveError(f"{path}: cannot write there ({exc.strerror})") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _publish_mode(tmp_path)
        os.replace(tmp_path, path)
    except OSError as exc:
        raise BnmoveError(f"{path}: cannot write it ({exc.strerror})") from exc
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path``."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise BnmoveError(f"{path}: cannot write there ({exc.strerror})") from exc
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_module(obj: object, path: Path) -> None:
    """``torch.save`` through an atomic temporary file, with bytes that depend on ``obj`` alone.

    torch names the archive inside the zip after the file it writes; written to the
    temporary name, identical runs gave different bytes. A file object keeps the
    default archive name.
    """
    import torch

    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        torch.save(obj, fh)

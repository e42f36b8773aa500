"""Atomic file writes: write to a hidden temporary file beside the target, then rename.

A reader never sees a half-written file, and a crash leaves the previous version (or nothing)
in place. Every output of the project goes through :func:`atomic_path`; a folder written as one
piece (a results page with its images) through :func:`atomic_dir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from util.errors import input_error


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    The temporary name keeps the target's suffixes (``.nii.gz``, ``.png``) so libraries that
    choose a format by extension write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _file_mode())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path`` to fill; on success it replaces ``path`` (a
    folder already there is swapped out, then deleted), on error it is removed and ``path`` is
    left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result gets a folder's mode
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, target: Path) -> None:
    """Rename the folder ``new`` to ``target``, replacing (then deleting) a folder already there."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        target.replace(old / target.name)
    try:
        new.replace(target)
    except OSError:
        if old is not None:
            (old / target.name).replace(target)  # put the earlier one back
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON atomically (stable key order, newline at the end)."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """Read a JSON file; a missing or unreadable file raises an InputError naming it and ``what`` it is."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, f"{what} not found{'; ' + missing_hint if missing_hint else ''}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise input_error(path, f"unreadable {what} ({exc})") from exc

"""The one error type for bad user input, and the one-line message of any per-item failure.

Library code raises :class:`InputError` with a message that names the file and what is wrong;
scripts catch it, print one line and exit with status 2, so users never see a traceback from
deep inside numpy for a problem in their data.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path


class InputError(ValueError):
    """Bad input data or arguments; the message names the file and the problem."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def _names_a_path(message: str) -> bool:
    """True if ``message`` already starts with ``<path>: `` (an existing or an absolute path)."""
    head, sep, _ = message.partition(": ")
    return bool(sep) and (os.path.isabs(head) or Path(head).exists())


def folder_problem(folder: str | PathLike) -> str | None:
    """Why ``folder`` cannot be made or written into, found without creating anything: a file
    stands at it or at one of its parents, or its nearest existing parent is not writable. None
    when it can be."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                return "is not a folder" + ("" if path == folder else f" ({path} is a file)")
            if not os.access(path, os.W_OK | os.X_OK):
                return f"cannot be written ({path} is not writable)"
            return None
    return None


def input_error(path: str | PathLike | None, problem: str) -> InputError:
    """Build an :class:`InputError` whose message starts with the offending path, on one line.

    A ``problem`` that already names a path (the message of a wrapped :class:`InputError`) keeps
    its own, more precise, path rather than gaining a second one.
    """
    problem = one_line(problem)
    if path is None or _names_a_path(problem):
        return InputError(problem)
    return InputError(f"{path}: {problem}")


def failure_line(exc: BaseException, where: str | PathLike) -> str:
    """One line naming a file and the problem for any exception (input errors, OS errors, bugs).

    Args:
        exc: the exception.
        where: the file or folder to name when the exception does not name one itself.
    """
    if isinstance(exc, InputError):
        return one_line(str(exc))
    if isinstance(exc, OSError) and exc.filename is not None:
        problem = exc.strerror or type(exc).__name__
        return one_line(f"{exc.filename}: {problem}")
    if isinstance(exc, MemoryError):
        return one_line(f"{where}: out of memory ({exc or 'MemoryError'})")
    return one_line(f"{where}: {type(exc).__name__}: {exc}")

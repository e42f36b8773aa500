"""The one error type for bad user input.

Library code raises :class:`InputError` with a message that names the file and what is wrong;
scripts catch it, print one line and exit with status 2, so users never see a traceback from
deep inside numpy for a problem in their data.
"""

from __future__ import annotations

from os import PathLike


class InputError(ValueError):
    """Bad input data or arguments; the message names the file and the problem."""


def input_error(path: str | PathLike | None, problem: str) -> InputError:
    """Build an :class:`InputError` whose message starts with the offending path."""
    return InputError(f"{path}: {problem}" if path is not None else problem)

"""Log lines that say which file or patient they are about.

Modules such as :mod:`straighten.centroids` log what they find (islands left out of a label, a
vertebra without a body) without knowing which scan they are working on; the command that calls
them does. :func:`prefixed_logs` puts that name in front of their lines while it runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence


class LinePrefix(logging.Filter):
    """Puts ``prefix + ': '`` in front of each line (nothing while ``prefix`` is empty)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefix and not record.getMessage().startswith(f"{self.prefix}:"):
            record.msg = f"{self.prefix}: {record.msg}"
        return True


@contextlib.contextmanager
def prefixed_logs(logger_names: Sequence[str], prefix: str = "") -> Iterator[LinePrefix]:
    """The lines of the named loggers carry the returned filter's ``prefix`` (settable) meanwhile."""
    name = LinePrefix(prefix)
    loggers = [logging.getLogger(n) for n in logger_names]
    for logger in loggers:
        logger.addFilter(name)
    try:
        yield name
    finally:
        for logger in loggers:
            logger.removeFilter(name)

"""A clear exit for the user-facing scripts whose stage is not built yet."""

from __future__ import annotations

import sys


def not_available(script: str, stage: str) -> int:
    """Print why ``script`` cannot run yet and return the exit status 2."""
    print(
        f"{script}: {stage} is not available in this version of HealthiVert yet; "
        "see README.md for what runs today.",
        file=sys.stderr,
    )
    return 2

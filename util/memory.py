"""How much memory this machine has, and a readable size, for refusing work that cannot fit."""

from __future__ import annotations

import os


def physical_memory_bytes() -> int | None:
    """Total physical memory of this machine in bytes, or None where it cannot be told."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return None


def human_bytes(n: float) -> str:
    """``5.3e15`` -> ``'4.7 PiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


def too_big(need_bytes: float) -> str | None:
    """Why ``need_bytes`` cannot fit in this machine's memory, or None if it can (or is unknown)."""
    total = physical_memory_bytes()
    if total is None or need_bytes <= total:
        return None
    return f"about {human_bytes(need_bytes)}, more than this machine's {human_bytes(total)} of memory"

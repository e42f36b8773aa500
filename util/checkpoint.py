"""Checkpoints written atomically and read with ``torch.load(weights_only=True)``.

Random-number state is stored as plain tensors and lists so it survives ``weights_only`` loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.atomic import atomic_path
from util.errors import input_error


def record_sha256(record: Any) -> str:
    """A short digest (16 hex digits) of a JSON-able record, whatever its dicts' key order: what
    made an output, written into its header and compared on a rerun."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (a checkpoint's identity, wherever it was copied); an unreadable
    file raises an InputError naming it."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise input_error(path, f"unreadable checkpoint ({exc.strerror})") from exc
    return digest.hexdigest()


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file, then rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint safely (tensors, containers and plain values only)."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, "checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise input_error(path, f"unreadable checkpoint ({exc})") from exc


def state_mismatch(own: Mapping[str, Any], saved: Any) -> str:
    """How a saved state dict differs from a network's own (``""`` when it fits): the counts of
    missing, unexpected and mis-shaped tensors, with the first of each named."""
    if not isinstance(saved, Mapping):
        return f"not a state dict (a {type(saved).__name__})"
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shaped = [
        k
        for k in own
        if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if shaped:
        k = shaped[0]
        parts.append(
            f"{len(shaped)} of another shape (first {k}: saved {tuple(saved[k].shape)}, "
            f"network {tuple(own[k].shape)})"
        )
    return "; ".join(parts)


def rng_state() -> dict:
    """Python, NumPy and torch random state as weights_only-safe objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

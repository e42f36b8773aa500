"""Paths of the dataset root (the reference's layout, so existing data drops in)::

<root>/raw/<pid>/<pid>.nii.gz          CT in HU
<root>/raw/<pid>/<pid>_msk.nii.gz      vertebra labels (``_seg`` accepted too)
<root>/raw/<pid>/<pid>.json            centroids
<root>/straightened/CT/<pid>_<vid>.nii.gz, straightened/label/<pid>_<vid>.nii.gz
<root>/straightened/curve/<pid>.json   the curve each patient was straightened along
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from util.errors import input_error

MASK_SUFFIXES = ("_msk.nii.gz", "_seg.nii.gz", "_msk.nii", "_seg.nii")
CT_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class RawCase:
    pid: str
    folder: Path
    mask: Path
    ct: Path | None  # None when the case has no CT file
    centroids: Path


def _first(folder: Path, pid: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        path = folder / f"{pid}{suffix}"
        if path.is_file():
            return path
    return None


def raw_case(root: str | os.PathLike, pid: str) -> RawCase:
    """The files of patient ``pid``; an error naming the folder if its mask is missing.

    The error says what is there instead: a mask path that is a directory, or the NIfTI files
    of the folder (a misnamed mask).
    """
    folder = Path(root) / "raw" / pid
    mask = _first(folder, pid, MASK_SUFFIXES)
    if mask is None:
        wanted = " or ".join(pid + s for s in MASK_SUFFIXES[:2])
        dirs = [folder / f"{pid}{s}" for s in MASK_SUFFIXES if (folder / f"{pid}{s}").is_dir()]
        if dirs:
            raise input_error(dirs[0], "the vertebra mask path is a directory, not a NIfTI file")
        found = sorted(p.name for p in folder.iterdir() if ".nii" in p.name) if folder.is_dir() else []
        there = f"; found {', '.join(found[:5])}" if found else "; the folder holds no NIfTI file"
        raise input_error(folder, f"no vertebra mask {wanted}{there}")
    return RawCase(pid, folder, mask, _first(folder, pid, CT_SUFFIXES), folder / f"{pid}.json")


def list_patients(root: str | os.PathLike) -> list[str]:
    """Patient ids under ``<root>/raw``: every folder (hidden ones aside), sorted.

    A folder without a usable mask is listed too, so that the commands report it by name
    (:func:`raw_case` raises for it) instead of skipping it silently.
    """
    raw = Path(root) / "raw"
    if not raw.is_dir():
        raise input_error(raw, "no raw/ folder: expected <root>/raw/<pid>/<pid>_msk.nii.gz")
    pids = sorted(p.name for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not pids:
        raise input_error(raw, "no patients: expected <root>/raw/<pid>/<pid>_msk.nii.gz")
    return pids


def shard(pids: list[str], spec: str | None) -> list[str]:
    """The patients of shard ``i/n`` (every n-th, starting at i), for cluster fan-out."""
    if not spec:
        return pids
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n, got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {spec!r}")
    return pids[i::n]


def straightened_paths(root: str | os.PathLike, pid: str, vid: int) -> tuple[Path, Path]:
    """(CT crop, label crop) of one vertebra."""
    base = Path(root) / "straightened"
    return base / "CT" / f"{pid}_{vid}.nii.gz", base / "label" / f"{pid}_{vid}.nii.gz"


def curve_path(root: str | os.PathLike, pid: str) -> Path:
    return Path(root) / "straightened" / "curve" / f"{pid}.json"

"""Reading what the evaluation scripts compare: split entries, synthesis outputs, phantom truth.

Synthesis outputs are ``<out>/CT_fake/<pid>_<vid>.nii.gz`` and ``<out>/label_fake/<pid>_<vid>.nii.gz``
on the grid of the crop ``<pid>_<vid>`` (DESIGN.md); a file on another grid is an input error.
Phantom truth is ``truth/vertebrae.csv`` and ``truth/<pid>/<pid>_healthy[_msk].nii.gz``.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from data.base_dataset import SPLITS, read_split, split_key
from data.crops import CROP_SUFFIX, Crop
from data.nifti_io import _read
from evaluation.heights import REGIONS
from util.errors import InputError, input_error

R = TypeVar("R")

FAKE_KINDS = ("CT_fake", "label_fake")


def run_script(
    done: Path, overwrite: bool, verb: str, work: Callable[[], R], summary: Callable[[R, float], str]
) -> int:
    """The body of an evaluation script's ``main``: skip when ``done`` (the file written last) exists
    and not ``overwrite``; else run ``work``, print ``summary(result, seconds)`` and return 0, or
    print one ``error:`` line and return 2 on bad input."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if done.exists() and not overwrite:
        print(f"{done} exists; pass --overwrite to {verb} again")
        return 0
    start = time.perf_counter()
    try:
        result = work()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary(result, time.perf_counter() - start))
    return 0


@dataclass(frozen=True)
class Entry:
    """One vertebra of the split file."""

    key: str
    pid: str
    vid: int
    grade: int | None  # None: no split file
    split: str | None


def split_entries(json_path: str | os.PathLike, phases: tuple[str, ...] = SPLITS) -> list[Entry]:
    """Every vertebra of ``vertebra_data.json`` in ``phases``; an error if none is listed."""
    data = read_split(json_path)
    entries = [
        Entry(key, *split_key(key), int(grade), phase)
        for phase in phases
        for key, grade in sorted(data.get(phase, {}).items())
    ]
    if not entries:
        raise input_error(json_path, f"no vertebrae in split(s) {', '.join(phases)}")
    return entries


def fake_path(output_folder: str | os.PathLike, kind: str, key: str) -> Path:
    return Path(output_folder) / kind / f"{key}{CROP_SUFFIX}"


def check_output_folder(output_folder: str | os.PathLike, kinds: tuple[str, ...]) -> Path:
    """The synthesis output folder, checked to hold the ``kinds`` sub-folders."""
    folder = Path(output_folder)
    if not folder.is_dir():
        raise input_error(folder, "synthesis output folder not found")
    for kind in kinds:
        if not (folder / kind).is_dir():
            raise input_error(folder, f"no {kind}/ folder (expected eval_3d_sagittal_twostage.py output)")
    return folder


def load_fake(output_folder: str | os.PathLike, kind: str, crop: Crop) -> np.ndarray:
    """A synthesis output of ``crop`` (float64), checked to lie on the crop's grid."""
    path = fake_path(output_folder, kind, crop.key)
    data, affine = _read(path, kind)
    if data.shape != crop.label.shape:
        raise input_error(path, f"shape {data.shape} differs from its crop {crop.label.shape}")
    if not np.allclose(affine, crop.affine, atol=1e-3):
        raise input_error(path, "affine differs from its crop's (not written on the crop's grid)")
    arr = np.asarray(data, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise input_error(path, f"{kind} contains NaN or infinite values")
    if kind == "CT_fake" and arr.size and (arr.min() < -0.5 or arr.max() > 255.5):
        raise input_error(
            path,
            f"values outside 0-255 ({arr.min():.4g}..{arr.max():.4g}); a CT_fake is windowed like its "
            "crop (uint8 0-255)",
        )
    return arr


def target_of(labels: np.ndarray, vid: int) -> np.ndarray:
    """The binary mask of vertebra ``vid`` in a label volume (rounded; a 0/1 volume is taken as is)."""
    lab = np.rint(np.asarray(labels)).astype(np.int64)
    target = lab == int(vid)
    if not target.any() and lab.max(initial=0) == 1:
        return lab == 1  # a binary synthesised target mask
    return target


@dataclass(frozen=True)
class TruthRow:
    """One row of a phantom's ``truth/vertebrae.csv``."""

    pid: str
    vid: int
    grade: int
    fracture_type: str
    healthy_mm: np.ndarray  # anterior, middle, posterior
    fractured_mm: np.ndarray

    @property
    def reduction(self) -> np.ndarray:
        """True relative height loss per region, (healthy - fractured) / healthy."""
        return (self.healthy_mm - self.fractured_mm) / self.healthy_mm


TRUTH_COLUMNS = (
    "pid",
    "vid",
    "grade",
    "fracture_type",
    *(f"healthy_{g}_mm" for g in REGIONS),
    *(f"fractured_{g}_mm" for g in REGIONS),
)


def read_truth_table(truth_dir: str | os.PathLike) -> dict[tuple[str, int], TruthRow]:
    """``truth/vertebrae.csv`` keyed by (pid, vid); a bad row is an input error that names it."""
    path = Path(truth_dir) / "vertebrae.csv"
    if not path.exists():
        raise input_error(path, "phantom truth table not found (is --truth a phantom's truth/ folder?)")
    rows = read_csv_rows(path, TRUTH_COLUMNS, "phantom truth table")
    table = {}
    for n, r in enumerate(rows, start=1):
        check_row_length(path, n, r)
        vid = csv_number(path, n, r, "vid", int)
        table[(r["pid"], vid)] = TruthRow(
            r["pid"],
            vid,
            csv_number(path, n, r, "grade", int),
            r["fracture_type"],
            # a height the analytic geometry could not give is written as nan
            np.array([csv_number(path, n, r, f"healthy_{g}_mm", allow_nan=True) for g in REGIONS]),
            np.array([csv_number(path, n, r, f"fractured_{g}_mm", allow_nan=True) for g in REGIONS]),
        )
    return table


def read_csv_rows(path: str | os.PathLike, required: tuple[str, ...], what: str) -> list[dict]:
    """Rows of a CSV file, checked to have the ``required`` columns."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, f"{what} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise input_error(path, f"{what} lacks columns {', '.join(missing)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise input_error(path, f"{what} is not a readable UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise input_error(path, f"{what} has no rows")
    return rows


def check_row_length(path: str | os.PathLike, row_number: int, row: dict) -> None:
    """An input error if data row ``row_number`` (1 = the first after the header) of a
    ``csv.DictReader`` had more or fewer fields than the header."""
    if None in row or None in row.values():
        more = "more" if None in row else "fewer"
        raise input_error(path, f"row {row_number} has {more} fields than the header")


def csv_number(
    path: str | os.PathLike,
    row_number: int,
    row: dict,
    column: str,
    kind: type = float,
    allow_nan: bool = False,
) -> float | int:
    """``row[column]`` as ``kind`` (``int``, or a finite ``float``; ``nan`` too with ``allow_nan``);
    otherwise an input error that names the file, the data row (1 = the first after the header),
    the column and the value."""
    value = row[column]
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not (np.isfinite(number) or (allow_nan and np.isnan(number))):
        what = "an integer" if kind is int else "a finite number"
        raise input_error(path, f"row {row_number}, column {column}: {value!r} is not {what}")
    return number


def csv_text(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text of ``rows`` with ``columns`` in that order."""
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()

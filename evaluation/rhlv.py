"""Relative height loss of a vertebra (RHLV) against its pseudo-healthy estimate: pure functions.

RHLV per region r (anterior, middle, posterior) is ``(H_syn,r - H_ori,r) / H_syn,r``: H_syn is the
healthy height (the synthesised pseudo-healthy vertebra, or the neighbour estimate), H_ori the
height of the vertebra as scanned. ``all`` uses the mean of the three region heights.

Two height definitions, each returning (all, anterior, middle, posterior) in mm:

- ``design`` (default): :func:`evaluation.heights.body_heights`, the one definition of DESIGN.md
  (medians of column extents over the central 40 % of the left-right extent, AP thirds). Each mask
  is measured on its own.
- ``reference``: the reference's filtered column means (REFERENCE.md section 8, its
  ``calculate_rhlv``), kept so its numbers can be reproduced: pixel counts per AP column on the
  central sagittal slices (centred on the original's mean LR voxel index), thirds cut at the
  integer columns ``int(ymin + range/3)`` and ``int(ymin + 2 range/3)`` of the *synthesised*
  mask's AP extent and applied to both masks, the synthesised heights of each region scaled up
  when the original's maximum there is larger, columns under 0.7 x the centre height dropped
  (the centre column is the slice's mean AP voxel index; the synthesised centre height is scaled
  once per slice by the whole slice's ratio and used for every region), and the kept columns
  averaged. Where no column is kept the height is NaN (the reference wrote 0).

The neighbour baseline (:func:`neighbour_estimate`) needs no GAN: a vertebra's healthy heights are
the mean of its adjacent vertebrae's heights, region by region, each neighbour measured on its own
crop; a neighbour that looks deformed itself (smallest region under 0.8 x its largest) is left out
while another neighbour is usable.

Arrays follow the crop axes: 0 = height (superior to inferior), 1 = anterior to posterior,
2 = right to left.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from evaluation.heights import REGIONS, body_heights, column_heights, genant_grade, unmeasured_note

log = logging.getLogger(__name__)

HEIGHT_DEFINITIONS = ("design", "reference")
ALL_REGIONS = ("all", *REGIONS)
# A neighbour whose smallest region height is under this share of its largest looks deformed
# (the Genant mild boundary, 20 % reduction) and is not used while another neighbour is.
NEIGHBOUR_SHAPE_RATIO = 0.8
# REFERENCE.md section 8: the column filter used by the reference's main().
REFERENCE_COLUMN_THRESHOLD = 0.7
# A pseudo-healthy vertebra smaller than this share of the (possibly fractured) original's volume
# is not a plausible healthy twin: a fracture takes volume away, it does not add it. Such a
# synthesis (typically a run applied to data unlike its training data) gives no RHLV.
MIN_SYNTH_VOLUME_RATIO = 0.5

RHLV_COLUMNS = (
    "vertebra",
    "pid",
    "vid",
    "grade",
    "split",
    *(f"h_syn_{r}" for r in REGIONS),
    *(f"h_ori_{r}" for r in REGIONS),
    *(f"rhlv_{r}" for r in ALL_REGIONS),
    "genant_from_rhlv",
    "note",
)


def rhlv(h_syn: np.ndarray, h_ori: np.ndarray) -> np.ndarray:
    """(H_syn - H_ori) / H_syn element-wise; NaN where H_syn is not a positive finite height."""
    syn = np.asarray(h_syn, dtype=np.float64)
    ori = np.asarray(h_ori, dtype=np.float64)
    ok = np.isfinite(syn) & (syn > 0)
    out = np.full(np.broadcast(syn, ori).shape, np.nan)
    np.divide(syn - ori, syn, out=out, where=ok)
    return out


def design_heights(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """(all, anterior, middle, posterior) in mm of one body mask by the DESIGN definition.

    ``all`` is the mean of the three region heights. A mask that cannot be measured (empty, or
    refused by the height definition) gives NaN, logged, so one vertebra does not stop a dataset.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.full(4, np.nan)
    try:
        regions = body_heights(mask, tuple(float(s) for s in spacing_mm)).as_array()
    except ValueError as exc:
        log.warning("a body mask of %d voxels could not be measured: %s", int(mask.sum()), exc)
        return np.full(4, np.nan)
    return np.r_[np.nanmean(regions) if np.isfinite(regions).any() else np.nan, regions]


def over_common_regions(h_syn: np.ndarray, h_ori: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H_syn, H_ori) with each ``all`` the mean of the regions measured on both sides.

    A region the definition leaves unmeasured on one side only would otherwise enter one side's
    ``all`` and not the other's, and ``rhlv_all`` would compare two different averages. For
    heights by the DESIGN definition, whose ``all`` is the mean of the three regions.
    """
    syn = np.array(h_syn, dtype=np.float64)
    ori = np.array(h_ori, dtype=np.float64)
    both = np.isfinite(syn[1:]) & np.isfinite(ori[1:])
    syn[0] = syn[1:][both].mean() if both.any() else np.nan
    ori[0] = ori[1:][both].mean() if both.any() else np.nan
    return syn, ori


def _reference_slices(ori: np.ndarray) -> range:
    """REFERENCE section 8 step 2: slices [centre - L, centre + L), ``centre`` the integer part of
    the original's mean axis-2 voxel index and ``L`` a fifth of its axis-2 extent (rounded down)."""
    per_slice = ori.sum(axis=(0, 1))
    lr = np.flatnonzero(per_slice)
    lo, hi = int(lr[0]), int(lr[-1])
    centre = _mean_index(per_slice)
    half = (hi - lo) // 5
    if half == 0:
        return range(centre, centre + 1)
    return range(centre - half, centre + half)


def reference_heights_pair(
    syn: np.ndarray,
    ori: np.ndarray,
    spacing_mm: Sequence[float],
    threshold: float = REFERENCE_COLUMN_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's filtered column means of a synthesised and an original mask (REFERENCE 8).

    Args:
        syn: the synthesised (healthy) binary mask of the vertebra.
        ori: the original binary mask, same grid.
        spacing_mm: voxel size per axis; column pixel counts are converted with ``spacing_mm[0]``.
        threshold: columns under this share of the centre column's height are dropped.

    Returns:
        (H_syn, H_ori), each (all, anterior, middle, posterior) in mm; NaN where nothing is kept.
        Measuring one mask alone is ``reference_heights_pair(m, m, ...)`` (the scaling is then 1).
    """
    syn = np.asarray(syn, dtype=bool)
    ori = np.asarray(ori, dtype=bool)
    if syn.shape != ori.shape:
        raise ValueError(f"masks differ in shape: {syn.shape} vs {ori.shape}")
    if not ori.any() or not syn.any():
        return np.full(4, np.nan), np.full(4, np.nan)
    pooled_syn: list[list[np.ndarray]] = [[] for _ in range(4)]
    pooled_ori: list[list[np.ndarray]] = [[] for _ in range(4)]
    for k in _reference_slices(ori):
        if not 0 <= k < ori.shape[2]:
            continue
        s2, o2 = syn[:, :, k], ori[:, :, k]
        if not s2.any() or not o2.any():
            continue
        cs, co = s2.sum(axis=0).astype(np.float64), o2.sum(axis=0).astype(np.float64)
        cols = np.flatnonzero(cs)
        ymin, ymax = int(cols[0]), int(cols[-1])
        t1 = int(ymin + (ymax - ymin) / 3)  # integer cut columns, as the reference slices them
        t2 = int(ymin + 2 * (ymax - ymin) / 3)
        parts = (slice(None), slice(None, t1), slice(t1, t2), slice(t2, None))
        # the centre column: the mean AP index of the slice's voxels (each column weighted by its count)
        centre_s = cs[_mean_index(cs)]
        centre_o = co[_mean_index(co)]
        for r, part in enumerate(parts):
            hs, ho = cs[part], co[part]
            if hs.size and ho.size and ho.max() > hs.max():
                ratio = ho.max() / (hs.max() + 1e-6)  # the reference's guarded ratio
                hs = hs * ratio
                if r == 0:  # the whole slice's ratio scales the centre height used by every region
                    centre_s = centre_s * ratio
            pooled_syn[r].append(hs[hs > threshold * centre_s])
            pooled_ori[r].append(ho[ho > threshold * centre_o])

    def mean_mm(chunks: list[np.ndarray]) -> float:
        values = np.concatenate(chunks) if chunks else np.empty(0)
        return float(values.mean() * float(spacing_mm[0])) if values.size else float("nan")

    return (
        np.array([mean_mm(c) for c in pooled_syn]),
        np.array([mean_mm(c) for c in pooled_ori]),
    )


def _mean_index(counts: np.ndarray) -> int:
    """The integer part of the mean index of the voxels counted in ``counts`` (per column or slice),
    as the reference's ``int(np.mean(np.where(mask)[axis]))``."""
    return int(np.dot(np.arange(counts.size), counts) / counts.sum())


def vertebra_heights(mask: np.ndarray, spacing_mm: Sequence[float], definition: str = "design") -> np.ndarray:
    """(all, anterior, middle, posterior) in mm of one vertebra's body mask by ``definition``."""
    if definition == "design":
        return design_heights(mask, spacing_mm)
    if definition == "reference":
        return reference_heights_pair(mask, mask, spacing_mm)[0]
    raise ValueError(f"unknown height definition {definition!r}; choose from {HEIGHT_DEFINITIONS}")


def paired_heights(
    syn: np.ndarray, ori: np.ndarray, spacing_mm: Sequence[float], definition: str = "design"
) -> tuple[np.ndarray, np.ndarray]:
    """(H_syn, H_ori) of a synthesised and an original mask on one grid, each (all, ant, mid, post)."""
    if definition == "reference":
        return reference_heights_pair(syn, ori, spacing_mm)
    return vertebra_heights(syn, spacing_mm, definition), vertebra_heights(ori, spacing_mm, definition)


def synthesis_problem(syn: np.ndarray, ori: np.ndarray, min_ratio: float = MIN_SYNTH_VOLUME_RATIO) -> str:
    """Why a synthesised target mask cannot serve as the healthy twin of ``ori`` ("" if it can).

    Empty, or under ``min_ratio`` of the original's voxel count (both masks on one grid).
    """
    n_syn, n_ori = int(np.count_nonzero(syn)), int(np.count_nonzero(ori))
    if n_syn == 0:
        return "no synthesised vertebra"
    if n_syn < min_ratio * n_ori:
        return (
            f"implausible synthesis: {100.0 * n_syn / n_ori:.2g} % of the original's volume "
            f"(under {100.0 * min_ratio:.0f} %)"
        )
    return ""


def is_measured(heights: np.ndarray) -> bool:
    """Whether all three region heights of (all, ant, mid, post) heights were measured."""
    return bool(np.isfinite(np.asarray(heights, dtype=np.float64)[-3:]).all())


def looks_deformed(heights: np.ndarray, ratio: float = NEIGHBOUR_SHAPE_RATIO) -> bool:
    """True if the smallest region height is under ``ratio`` x the largest (a likely fracture)."""
    regions = np.asarray(heights, dtype=np.float64)[-3:]
    if not np.isfinite(regions).all():
        return True
    return bool(regions.min() < ratio * regions.max())


def neighbour_estimate(neighbour_heights: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """Healthy (all, ant, mid, post) heights of a vertebra from its neighbours' heights.

    The mean over the usable neighbours, region by region (between an upper and a lower neighbour
    this interpolates the level's height linearly). Neighbours that look deformed are left out
    unless every measured neighbour does.

    Returns:
        (estimate, indices of the neighbours used); NaN and [] when no neighbour was measured.
    """
    heights = [np.asarray(h, dtype=np.float64) for h in neighbour_heights]
    measured = [i for i, h in enumerate(heights) if is_measured(h)]
    if not measured:
        return np.full(4, np.nan), []
    used = [i for i in measured if not looks_deformed(heights[i])] or measured
    return np.mean([heights[i] for i in used], axis=0), used


def rhlv_missing(row: dict) -> bool:
    """Whether a :func:`rhlv_row` lacks an RHLV value (the grading leaves such rows out)."""
    return any(row[f"rhlv_{region}"] == "" for region in ALL_REGIONS)


def neighbour_note(keys: Sequence[str], used: Sequence[int], deformed: Sequence[bool]) -> str:
    """What makes a neighbour estimate (:func:`neighbour_estimate` over the neighbours ``keys``,
    ``used`` of them, ``deformed`` as :func:`looks_deformed` says) weaker than the mean of two
    healthy-looking neighbours, or "" when nothing does (or no neighbour was used: then there is
    no estimate): neighbours that look deformed (the only ones there were), or one neighbour (the
    end of the scan, or the other looks deformed): heights change from level to level, so one side
    alone is biased."""
    if not used:
        return ""
    names = ", ".join(keys[i] for i in used)
    if any(deformed[i] for i in used):  # used only when every measured neighbour looks deformed
        if len(used) == 1:
            return f"healthy estimate from one neighbour, which looks deformed ({names})"
        return f"healthy estimate from neighbours that look deformed ({names})"
    if len(used) == 1:
        other = ", the other looks deformed" if len(keys) > 1 and any(deformed) else ""
        return f"healthy estimate from one neighbour ({names}{other})"
    return ""


def column_loss_map(syn_column_heights_mm: np.ndarray, ori_column_heights_mm: np.ndarray) -> np.ndarray:
    """Per-column height loss (H_syn - H_ori) / H_syn on the AP x LR grid.

    NaN where either column is absent: the map covers the columns both vertebrae share.
    """
    return rhlv(syn_column_heights_mm, ori_column_heights_mm)


def column_map(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Column heights (mm) over the AP x LR grid of one body mask (NaN where absent)."""
    return column_heights(np.asarray(mask, dtype=bool), float(spacing_mm[0]))


def mean_column_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of several column-height maps on the same grid, only where every map has a column.

    Neighbour crops are centred on their own bodies, so index (j, k) is the same place relative to
    each body; averaging them gives a per-column healthy estimate for the height-loss map.
    """
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    out = stack.mean(axis=0)
    out[~np.isfinite(stack).all(axis=0)] = np.nan
    return out


def rhlv_row(
    key: str,
    pid: str,
    vid: int,
    grade: int | None,
    split: str | None,
    h_syn: np.ndarray,
    h_ori: np.ndarray,
    note: str = "",
    remark: str = "",
) -> dict:
    """One ``rhlv.csv`` row (heights rounded to 0.001 mm, RHLV to 1e-5); ``note`` says why a value
    is missing, ``remark`` what else a reader should know (both in the ``note`` column)."""
    loss = rhlv(h_syn, h_ori)
    row: dict = {"vertebra": key, "pid": pid, "vid": int(vid), "grade": "" if grade is None else int(grade)}
    row["split"] = split or ""
    for prefix, values in (("h_syn", h_syn), ("h_ori", h_ori)):
        for i, region in enumerate(REGIONS, start=1):
            row[f"{prefix}_{region}"] = _rounded(values[i], 3)
    for i, region in enumerate(ALL_REGIONS):
        row[f"rhlv_{region}"] = _rounded(loss[i], 5)
    regional = loss[1:]
    # Genant's semi-quantitative grade of the largest regional loss (20 / 25 / 40 % boundaries):
    # a grade for scans with no graded training data; the SVM grading learns its own boundaries
    row["genant_from_rhlv"] = genant_grade(float(np.nanmax(regional))) if np.isfinite(regional).any() else ""
    missing = [region for region, value in zip(REGIONS, regional, strict=True) if not np.isfinite(value)]
    if not note:  # the height definition left a region (or the whole body) unmeasured
        note = unmeasured_note(missing)
    row["note"] = "; ".join(part for part in (note, remark) if part)
    return row


def _rounded(value: float, digits: int) -> float | str:
    return round(float(value), digits) if np.isfinite(value) else ""


__all__ = [
    "ALL_REGIONS",
    "HEIGHT_DEFINITIONS",
    "RHLV_COLUMNS",
    "column_loss_map",
    "column_map",
    "design_heights",
    "looks_deformed",
    "mean_column_map",
    "neighbour_estimate",
    "over_common_regions",
    "paired_heights",
    "reference_heights_pair",
    "rhlv",
    "rhlv_row",
    "synthesis_problem",
    "truth_errors",
    "vertebra_heights",
]


def truth_errors(rows: Sequence[dict], truth: dict) -> dict:
    """Errors of ``rhlv.csv`` rows against a phantom's truth, per split and overall.

    Args:
        rows: rows as written by :func:`rhlv_row`.
        truth: {(pid, vid): row} with ``grade``, ``healthy_mm`` and ``reduction`` (per region).

    Returns:
        For the fractured vertebrae (truth grade >= 1) and for all: the mean absolute error of the
        healthy height estimate H_syn (mm) and of RHLV against the true relative height loss,
        over the three regions, and how many vertebrae were compared.
    """
    groups: dict[str, dict[str, list]] = {}
    for row in rows:
        t = truth.get((row["pid"], int(row["vid"])))
        if t is None:
            continue
        h_syn = np.array([_number(row[f"h_syn_{r}"]) for r in REGIONS])
        loss = np.array([_number(row[f"rhlv_{r}"]) for r in REGIONS])
        h_err, r_err = np.abs(h_syn - t.healthy_mm), np.abs(loss - t.reduction)
        for split in ("all", row.get("split") or "none"):
            for subset in ("all", "fractured") if t.grade >= 1 else ("all",):
                g = groups.setdefault(f"{split}/{subset}", {"h": [], "r": []})
                g["h"].append(h_err)
                g["r"].append(r_err)
    out = {}
    for name, g in sorted(groups.items()):
        h, r = np.array(g["h"]), np.array(g["r"])
        out[name] = {
            "n": len(h),
            "height_mae_mm": _finite_mean(h),
            "rhlv_mae": _finite_mean(r),
            "n_unmeasured": int((~np.isfinite(h).all(axis=1)).sum()),
        }
    return out


def _number(value) -> float:
    return float(value) if value not in ("", None) else float("nan")


def _finite_mean(values: np.ndarray) -> float | None:
    ok = values[np.isfinite(values)]
    return round(float(ok.mean()), 5) if ok.size else None

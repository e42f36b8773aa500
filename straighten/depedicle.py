"""De-pedicling: keep each vertebra's body, remove its posterior elements.

Works on straightened labels (axis 0 along the spine, axis 1 anterior to posterior, axis 2 right
to left). What separates a body from its posterior elements everywhere is the spinal canal:
behind the body, the midline is empty until the lamina. For each vertebra:

1. Keep its connected components of real size (stray fragments go).
2. Find its midline: the centre of the left-right extent of its anterior part (the body), and
   a band around it narrower than any canal.
3. The canal is where no height row fills the band, right behind the body. On each row that
   fills the band in front of the canal, the posterior wall is the start of that row's empty
   stretch (of at least ``gap_mm``) reaching the canal; a gap in front of it (across a concave
   endplate) does not count. The walls of all rows lie on a line (straight, or tilted with the
   body): a robust (Theil-Sen) fit replaces rows far off it. Rows that fill the band only
   behind the canal, or not at all, hold no body (processes above or below it, pedicles over a
   collapsed body).
4. Everything behind the wall goes: pedicles, lamina, transverse, articular and spinous
   processes. The largest remaining component is the body.

It does not depend on where the curve crosses the vertebra or on one line of voxels, so an
off-centre curve, a tilted or scoliotic vertebra, wide transverse processes and coarse 3 mm
masks all work.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage, stats

from data import label_schemes

log = logging.getLogger(__name__)

BAND_FRACTION = 0.13  # half-width of the midline band, as a fraction of the body's width
WALL_TOLERANCE_MM = 3.0
FILLED = 0.5
GAP_MM = 3.0
MIN_COMPONENT_FRACTION = 0.1


def _empty_runs(filled: np.ndarray, min_len: int) -> list[tuple[int, int]]:
    """[start, stop) of the runs of False at least ``min_len`` long (a run reaching the end counts)."""
    padded = np.r_[True, filled, True]
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    runs = list(zip(edges[::2], edges[1::2], strict=True))
    return [(a, b) for a, b in runs if b - a >= min_len or b == filled.size]


def posterior_wall(mask: np.ndarray, spacing_mm: float = 1.0, gap_mm: float = GAP_MM) -> np.ndarray:
    """Per height row of a binary vertebra (height, AP, LR), the AP index where its body ends.

    Rows without body (only processes, or nothing) get -1.
    """
    ap = np.flatnonzero(mask.any(axis=(0, 2)))
    front = mask[:, : ap[0] + max(2, int(0.4 * (ap[-1] - ap[0] + 1)))]  # the anterior part: body
    lr = np.flatnonzero(front.any(axis=(0, 1)))
    centre = 0.5 * (lr[0] + lr[-1])
    half = max(1.0, BAND_FRACTION * (lr[-1] - lr[0] + 1))
    band = slice(int(np.floor(centre - half)), int(np.ceil(centre + half)) + 1)
    filled = mask[:, :, band].mean(axis=2) >= FILLED  # (height, AP)
    gap = max(1, int(round(gap_mm / spacing_mm)))
    wall = np.full(mask.shape[0], -1, dtype=np.int64)
    # the canal: where no row fills the midline, right behind the first filled stretch
    any_row = filled.any(axis=0)
    if not any_row.any():
        return wall
    first = int(np.argmax(any_row))
    canal = next((a for a, _ in _empty_runs(any_row, gap) if a > first), any_row.size)
    for h in np.flatnonzero(filled[:, :canal].any(axis=1)):
        runs = [(a, b) for a, b in _empty_runs(filled[h], gap) if b > canal or (a <= canal < b)]
        wall[h] = runs[0][0] if runs else filled.shape[1]
    rows = np.flatnonzero(wall >= 0)
    if rows.size >= 4:
        # the wall is a line over the rows (straight, or tilted with the body); rows far off it
        # (an endplate ring whose midline is empty) take the line's value
        slope, intercept, _, _ = stats.theilslopes(wall[rows], rows)
        line = np.rint(intercept + slope * rows).astype(np.int64)
        tolerance = max(2, int(round(WALL_TOLERANCE_MM / spacing_mm)))
        off = np.abs(wall[rows] - line) > tolerance
        wall[rows[off]] = line[off]
    return wall


def body_mask(vertebra: np.ndarray, spacing_mm: float = 1.0) -> np.ndarray:
    """The body part of one vertebra's binary mask (axes: height, AP, LR)."""
    mask = np.asarray(vertebra, dtype=bool)
    if not mask.any():
        return mask.copy()
    comps, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n > 1:
        sizes = np.bincount(comps.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_COMPONENT_FRACTION * sizes.max()) + 1
        mask = np.isin(comps, keep)
    wall = posterior_wall(mask, spacing_mm)
    body = mask & (np.arange(mask.shape[1])[None, :] < wall[:, None])[:, :, None]
    if not body.any():
        return body
    comps, n = ndimage.label(body, structure=np.ones((3, 3, 3)))
    if n > 1:
        body = comps == (np.argmax(np.bincount(comps.ravel())[1:]) + 1)
    return body


def depedicle(labels: np.ndarray, spacing_mm: float = 1.0) -> np.ndarray:
    """Labels with every vertebra reduced to its body; sacrum, coccyx and other ids are kept."""
    out = labels.copy()
    boxes = ndimage.find_objects(labels)
    for vid, box in enumerate(boxes, start=1):
        if box is None or not label_schemes.is_vertebra(vid):
            continue
        sub = labels[box] == vid
        body = body_mask(sub, spacing_mm)
        if not body.any():
            log.warning("label %d: no vertebral body found; its label is kept whole", vid)
            continue
        region = out[box]
        region[sub & ~body] = 0
    return out

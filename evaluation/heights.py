"""Vertebral body heights: the one definition used everywhere, and Genant grades from them.

    python evaluation/heights.py --dataroot D --out heights.csv [--overwrite]

Definition (DESIGN.md), applied by :func:`measure_body` to a binary body mask:

0. **The mask as a field.** The mask is smoothed by a Gaussian of one voxel, divided column by
   column by its smoothed column footprint (:func:`antialiased`): the body is where the field is
   at least 0.5, and that level runs between a sloped or curved endplate's voxel steps, while a
   flat face and the walls stay where they are (a box keeps its voxel heights).
1. **The body's own frame.** The superior and inferior endplates are each fitted with a plane
   (least squares over the columns of the central 60 % of the body's AP and LR extents, so the
   rim does not pull it; one pass drops outliers); the height axis is the bisector of their two
   normals. The anterior-posterior axis is the short in-plane principal axis of the body's
   cross-section (the long one is left-right), pointing the crop's way (anterior to posterior);
   a near-round cross-section, or a short axis more than 45° from the crop's AP axis, keeps the
   crop's AP axis. The field is resampled (linear) on that frame at its finest voxel size, on a
   grid whose centre node is a voxel centre; two rounds, the second fitted to the resampled
   field where its columns cross 0.5, as they are measured. ``tilt_deg`` is the angle between
   the height axis and the crop's axis 0 (the curve's tangent).
2. **Columns.** On the central 40 % of the body's left-right extent, each sagittal plane is cut
   into columns; a column's height is the body's extent along the height axis, each end where
   the field crosses 0.5 between two samples (:func:`column_heights`; the field itself when the
   frame is the crop's own and the voxels are cubes). A column the body fills over less than
   ``MIN_COLUMN_FILL`` (0.34) of that extent is not a column of the body (the lips of
   osteophytes at both endplates with nothing between, in front of the wall).
3. **Rim rule.** On each plane, a straight line fitted to the column heights of the inner half
   of its AP extent (``RIM_INNER``) predicts every column's height; walking inward from the
   anterior end, and from the posterior end, a column is dropped while it is shorter than
   ``RIM_FRACTION`` (85 %) of that prediction, over at most ``RIM_MAX_FRACTION`` (25 %) of the
   plane's AP extent. A bevelled or rounded rim, or the lip of an osteophyte standing out of the
   wall, falls below the line at the wall; a wedge fracture is the line itself, however steep.
   (The rule before compared each column with the one 4 mm further in: on a severe wedge, whose
   anterior wall is a few mm tall, it ate into the fracture as far as the mask's steps allowed,
   so a smooth truth and a 1 mm mask disagreed by up to 2.4 mm.) Columns longer than the line
   are kept: a biconcave body is taller at its walls than inside.
4. **Regions.** The remaining AP extent of each plane is cut into thirds; a region's height
   (anterior, middle, posterior) is the median over its columns and planes, in mm.

:func:`heights_from_columns` applies steps 2-4 to column heights from any source (the phantom
evaluates it on its analytic geometry, already in the body's frame), so truth and measurement
cannot drift apart. :func:`body_heights` is the short form (:class:`BodyHeights` only).

Arrays follow the straightened-crop axis order: axis 0 = height (superior to inferior), axis 1 =
anterior to posterior, axis 2 = right to left.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from scipy import ndimage
from tqdm import tqdm

REGIONS = ("anterior", "middle", "posterior")
# Genant semi-quantitative grade boundaries on the largest relative height reduction.
GENANT_MILD = 0.20
GENANT_MODERATE = 0.25
GENANT_SEVERE = 0.40
# The rim rule (module docstring, step 3).
RIM_FRACTION = 0.85
RIM_MAX_FRACTION = 0.25
# A column must be filled over this fraction of its extent to be a column of the body (step 2).
MIN_COLUMN_FILL = 0.34
# The inner part of a plane (fractions of its AP extent) whose straight-line fit predicts the wall columns.
RIM_INNER = (0.25, 0.75)
# Endplate planes are fitted over this central fraction of the body's AP and LR extents.
ENDPLATE_CORE = 0.6
# A cross-section whose principal variances differ less than this keeps the crop's AP axis.
ROUND_SECTION_RATIO = 1.2
# The AP axis turns at most this far (degrees) from the crop's AP axis.
MAX_AP_TURN_DEG = 45.0
# The mask is smoothed by a Gaussian of this many voxels (per axis) before it is measured
# (:func:`antialiased`), cut off at ANTIALIAS_TRUNCATE of them.
ANTIALIAS_SIGMA_VOXELS = 1.0
ANTIALIAS_TRUNCATE = 2.0


@dataclass(frozen=True)
class BodyHeights:
    """Anterior, middle and posterior vertebral body heights in mm (NaN where a region is empty)."""

    anterior: float
    middle: float
    posterior: float

    def as_array(self) -> np.ndarray:
        return np.array([self.anterior, self.middle, self.posterior], dtype=np.float64)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class BodyMeasurement:
    """Heights in the body's own frame, the tilt (degrees) of its height axis against the crop's
    axis 0, and the frame (rows: height, AP, LR unit axes in crop mm coordinates)."""

    heights: BodyHeights
    tilt_deg: float
    frame: np.ndarray


def rim_columns(heights: np.ndarray, ap_spacing_mm: float) -> np.ndarray:
    """Which columns of one sagittal plane (AP order) are rim by the rim rule (module docstring).

    Args:
        heights: column heights along AP, NaN where the column misses the body.
        ap_spacing_mm: distance between columns (the rule itself works in fractions of the
            plane's extent, so the same body gives the same rim at any spacing).

    Returns:
        Boolean array, True for the rim columns at the anterior and posterior ends.
    """
    rim = np.zeros(heights.shape, dtype=bool)
    present = np.flatnonzero(np.isfinite(heights) & (heights > 0))
    if present.size < 3:
        return rim
    j0, j1 = present[0], present[-1]
    n = j1 - j0 + 1
    t = (present - j0 + 0.5) / n
    inner = present[(t >= RIM_INNER[0]) & (t <= RIM_INNER[1])]
    if inner.size < 2:
        return rim
    # the height the inner half of the plane predicts at each column (a wedge is a straight line)
    slope, intercept = np.polyfit(inner.astype(np.float64), heights[inner], 1)
    limit = int(np.floor(RIM_MAX_FRACTION * n))
    h = np.nan_to_num(heights, nan=0.0)
    for start, step in ((j0, 1), (j1, -1)):
        for k in range(limit):
            j = start + step * k
            if h[j] >= RIM_FRACTION * (intercept + slope * j):
                break
            rim[j] = True
    return rim


def central_planes(has_body: np.ndarray, lr_fraction: float = 0.4) -> np.ndarray:
    """Indices of the sagittal planes in the central ``lr_fraction`` of the body's left-right
    extent (step 2), from which planes hold the body (1D bool); at least the middle one."""
    planes = np.flatnonzero(has_body)
    k0, k1 = planes[0], planes[-1]
    pos = (np.arange(k0, k1 + 1) - k0 + 0.5) / (k1 - k0 + 1)
    keep = np.arange(k0, k1 + 1)[np.abs(pos - 0.5) <= lr_fraction / 2 + 1e-9]
    return keep if keep.size else np.array([(k0 + k1) // 2])


def heights_from_columns(
    column_heights_mm: np.ndarray,
    lr_fraction: float = 0.4,
    ap_spacing_mm: float = 1.0,
    exclude_rim: bool = True,
) -> BodyHeights:
    """Region heights from a grid of column heights (steps 2-4 of the definition).

    Args:
        column_heights_mm: (AP, LR) array; the body's extent along the height axis for each
            column, NaN (or <= 0) where the column misses the body.
        lr_fraction: the central fraction of the left-right extent whose sagittal planes are used.
        ap_spacing_mm: distance between columns along AP (the rim rule works in mm).
        exclude_rim: apply the rim rule (off: every column counts, the definition before it).

    Returns:
        The median column height of the anterior, middle and posterior thirds.
    """
    cols = np.asarray(column_heights_mm, dtype=np.float64)
    if cols.ndim != 2:
        raise ValueError(f"column heights must be 2D (AP, LR), got shape {cols.shape}")
    present = np.isfinite(cols) & (cols > 0)
    if not present.any():
        raise ValueError("the body mask is empty")
    if not 0 < lr_fraction <= 1:
        raise ValueError(f"lr_fraction must be in (0, 1], got {lr_fraction}")

    keep = central_planes(present.any(axis=0), lr_fraction)
    sub = present[:, keep]
    heights = cols[:, keep]
    if exclude_rim:
        rim = np.stack(
            [
                rim_columns(np.where(sub[:, i], heights[:, i], np.nan), ap_spacing_mm)
                for i in range(sub.shape[1])
            ],
            axis=1,
        )
        sub = sub & ~rim

    n_ap = sub.shape[0]
    valid = sub.any(axis=0)
    sub, heights = sub[:, valid], heights[:, valid]
    j0 = np.argmax(sub, axis=0)
    j1 = n_ap - 1 - np.argmax(sub[::-1], axis=0)
    j = np.arange(n_ap)[:, None]
    t = (j - j0[None, :] + 0.5) / (j1 - j0 + 1)[None, :]
    region = np.minimum((t * 3).astype(np.int64), 2)
    out = []
    for r in range(3):
        values = heights[sub & (region == r)]
        out.append(float(np.median(values)) if values.size else float("nan"))
    return BodyHeights(*out)


def _as_field(body_mask: np.ndarray) -> np.ndarray:
    """A binary mask as 0/1, or a resampled field clipped to [0, 1] (float32, 3D)."""
    field = np.asarray(body_mask)
    if field.ndim != 3:
        raise ValueError(f"body mask must be 3D, got shape {field.shape}")
    return field.astype(np.float32) if field.dtype == bool else np.clip(field.astype(np.float32), 0.0, 1.0)


def column_ends(field: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each (AP, LR) column of a field in [0, 1] enters and leaves the body along axis 0, in
    samples (continuous; sample ``i`` is at ``i``), the samples from its first body sample (>= 0.5)
    to its last, and the body samples: ``(lo, hi, count, inside)``.

    Each end lies where the sample inside it (value ``v_in``) and the one outside it (``v_out``,
    0 beyond the array), interpolated linearly, cross 0.5: ``(v_in - 0.5) / (v_in - v_out)`` of a
    sample out from the inside one. For a binary mask that is half-way (the outer faces of the
    first and last voxel). Columns without a body sample give meaningless ends; mask them with
    ``inside.any(axis=0)``.
    """
    inside = field >= 0.5
    n = inside.shape[0]
    first = np.argmax(inside, axis=0)
    last = n - 1 - np.argmax(inside[::-1], axis=0)
    padded = np.pad(field, ((1, 1), (0, 0), (0, 0)))  # 0 beyond the array
    ap, lr = np.indices(first.shape)
    inside_lo, outside_lo = padded[first + 1, ap, lr], padded[first, ap, lr]
    inside_hi, outside_hi = padded[last + 1, ap, lr], padded[last + 2, ap, lr]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        below = np.nan_to_num((inside_lo - 0.5) / (inside_lo - outside_lo), nan=0.5, posinf=0.5, neginf=0.5)
        above = np.nan_to_num((inside_hi - 0.5) / (inside_hi - outside_hi), nan=0.5, posinf=0.5, neginf=0.5)
    return first - below, last + above, last - first + 1, inside


def column_heights(body_mask: np.ndarray, height_spacing_mm: float) -> np.ndarray:
    """Each (AP, LR) column's extent along axis 0 in mm; NaN if empty or hollow (filled over less
    than ``MIN_COLUMN_FILL`` of that extent).

    ``body_mask`` is a binary mask, or a field in [0, 1] (a mask resampled by linear
    interpolation) whose 0.5 level is the body's boundary; :func:`column_ends` places each end, so
    a binary mask measures whole voxels and a resampled one keeps what its interpolation knows of
    the boundary.
    """
    lo, hi, count, inside = column_ends(_as_field(body_mask))
    # a column the body hardly fills (two osteophyte lips, nothing between) is no body column
    body = inside.any(axis=0) & (inside.sum(axis=0) >= MIN_COLUMN_FILL * count)
    return np.where(body, (hi - lo) * float(height_spacing_mm), np.nan)


def _plane_normal(points: np.ndarray) -> np.ndarray | None:
    """Unit normal (towards +axis 0) of the plane h = a*ap + b*lr + c fitted to (h, ap, lr) points."""
    if len(points) < 6:
        return None
    design = np.c_[points[:, 1], points[:, 2], np.ones(len(points))]
    keep = np.ones(len(points), dtype=bool)
    for _ in range(2):  # least squares, then once more without the outliers
        coef, *_ = np.linalg.lstsq(design[keep], points[keep, 0], rcond=None)
        resid = points[:, 0] - design @ coef
        mad = np.median(np.abs(resid[keep] - np.median(resid[keep]))) + 1e-6
        keep = np.abs(resid - np.median(resid[keep])) <= 3.0 * 1.4826 * mad + 0.5
        if keep.sum() < 6:
            return None
    normal = np.array([1.0, -coef[0], -coef[1]])
    return normal / np.linalg.norm(normal)


def endplate_normal(
    top_mm: np.ndarray, bottom_mm: np.ndarray, ap_mm: np.ndarray, lr_mm: np.ndarray
) -> np.ndarray:
    """Height axis (unit (h, ap, lr), towards +h) normal to a body's endplates, from its columns.

    Args:
        top_mm, bottom_mm: where each column enters and leaves the body along h (1D, mm).
        ap_mm, lr_mm: the column's AP and LR positions (1D, mm).

    Returns:
        The bisector of the normals of planes fitted to the two surfaces over the central
        ``ENDPLATE_CORE`` of the columns' AP and LR extents; +h when the fit has too few columns.
    """
    core = np.ones(np.shape(ap_mm), dtype=bool)
    for pos in (ap_mm, lr_mm):
        lo, hi = pos.min(), pos.max()
        margin = (1.0 - ENDPLATE_CORE) / 2 * (hi - lo)
        core &= (pos >= lo + margin) & (pos <= hi - margin)
    normals = []
    for surface in (top_mm, bottom_mm):
        normal = _plane_normal(np.c_[surface[core], ap_mm[core], lr_mm[core]])
        if normal is None:
            return np.array([1.0, 0.0, 0.0])
        normals.append(normal)
    axis = normals[0] + normals[1]
    return axis / np.linalg.norm(axis)


def endplate_axis(mask: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Height axis (unit, crop mm coordinates (h, ap, lr), towards +axis 0) normal to the endplates
    of a mask or resampled field (:func:`endplate_normal` on its surfaces: where each axis-0 column
    enters and leaves the body, :func:`column_ends`), or axis 0 when it has too few columns."""
    lo, hi, _, inside = column_ends(_as_field(mask))
    has = inside.any(axis=0)
    if has.sum() < 6:
        return np.array([1.0, 0.0, 0.0])
    jj, kk = np.nonzero(has)
    return endplate_normal(
        lo[jj, kk] * spacing_mm[0], hi[jj, kk] * spacing_mm[0], jj * spacing_mm[1], kk * spacing_mm[2]
    )


def _in_plane_ap(points_mm: np.ndarray, height_axis: np.ndarray) -> np.ndarray:
    """AP axis: the short principal axis of the cross-section, pointing like +axis 1."""
    ref = np.array([0.0, 1.0, 0.0])
    ref_ap = ref - (ref @ height_axis) * height_axis
    ref_ap /= np.linalg.norm(ref_ap)
    ref_lr = np.cross(height_axis, ref_ap)
    centred = points_mm - points_mm.mean(axis=0)
    uv = np.c_[centred @ ref_ap, centred @ ref_lr]
    values, vectors = np.linalg.eigh(np.cov(uv.T))
    if values[1] < ROUND_SECTION_RATIO * values[0]:
        return ref_ap  # near round: no reliable short axis
    short = vectors[:, 0]
    if abs(short[0]) < np.cos(np.radians(MAX_AP_TURN_DEG)):
        return ref_ap  # the short axis runs left-right (a body narrower than deep): not an AP axis
    ap = short[0] * ref_ap + short[1] * ref_lr
    return ap if ap @ ref >= 0 else -ap


def body_frame(mask: np.ndarray, spacing_mm: np.ndarray) -> np.ndarray:
    """Rows: the body's height, AP and LR unit axes in crop mm coordinates (h, ap, lr), of a mask
    or resampled field (the body is where it is at least 0.5)."""
    height = endplate_axis(mask, spacing_mm)
    points = np.argwhere(_as_field(mask) >= 0.5) * spacing_mm
    ap = _in_plane_ap(points, height)
    lr = np.cross(height, ap)
    return np.stack([height, ap, lr])


def antialiased(mask: np.ndarray) -> np.ndarray:
    """A binary mask as a field in [0, 1] whose 0.5 level runs between the voxels' steps.

    The mask is smoothed by a Gaussian of ``ANTIALIAS_SIGMA_VOXELS`` per axis and divided, column
    by column, by its column footprint (the axis-0 columns that hold body) smoothed the same way
    in-plane; columns outside the footprint stay 0. Each column's profile so becomes a weighted
    mean of its neighbouring body columns' profiles, smoothed along axis 0: where the endplate
    steps from one voxel to the next, the 0.5 crossing moves between them, as the surface the
    mask was drawn from does. A flat face stays where it is (a symmetric kernel crosses 0.5 at
    the face), and so does a wall (the footprint division leaves no fall-off at the body's edge):
    a box keeps its voxel heights. Arrays follow the crop's axis order; the mask needs
    ``antialias_margin()`` empty voxels round the body.
    """
    body = np.asarray(mask, dtype=bool)
    kw = dict(sigma=ANTIALIAS_SIGMA_VOXELS, mode="constant", cval=0.0, truncate=ANTIALIAS_TRUNCATE)
    footprint = body.any(axis=0)
    smooth = ndimage.gaussian_filter(body.astype(np.float32), **kw)
    weight = ndimage.gaussian_filter(footprint.astype(np.float32), **kw)
    field = np.where(footprint[None], smooth / np.maximum(weight, 1e-6)[None], 0.0)
    return np.clip(field, 0.0, 1.0).astype(np.float32)


def antialias_margin() -> int:
    """Voxels the smoothing of :func:`antialiased` reaches beyond the body."""
    return int(ANTIALIAS_TRUNCATE * ANTIALIAS_SIGMA_VOXELS + 0.5)


def _resample_body(
    field: np.ndarray, spacing_mm: np.ndarray, frame: np.ndarray, step_mm: float
) -> np.ndarray:
    """A mask or field resampled (linear, values in [0, 1]; the body is >= 0.5) on a grid with
    ``frame`` axes and ``step_mm`` voxels.

    The grid's centre node is a voxel centre of the input and the grid runs the same number of
    nodes either side of it, so with the crop's own axes every node of the finest axis is an
    input voxel centre. (A grid with an even number of nodes put them half-way between voxels:
    every sample at a face of the body was exactly 0.5, and the least turn of the frame decided
    which side of 0.5 it fell on.)
    """
    field = _as_field(field)
    points = np.argwhere(field >= 0.5) * spacing_mm
    centre = np.rint(points.mean(axis=0) / spacing_mm) * spacing_mm
    local = (points - centre) @ frame.T
    half = np.abs(local).max(axis=0) + 2.0 * float(spacing_mm.max())
    nodes = np.ceil(half / step_mm).astype(np.int64)  # either side of the centre
    shape = tuple(int(n) for n in 2 * nodes + 1)
    start = -nodes * step_mm
    # output index i -> local mm start + i*step -> crop mm centre + frame.T @ local -> input index
    matrix = (frame.T * step_mm) / spacing_mm[:, None]
    offset = (centre + frame.T @ start) / spacing_mm
    out = ndimage.affine_transform(
        field, matrix, offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0
    )
    return np.clip(out, 0.0, 1.0)


def measure_body(
    body_mask: np.ndarray,
    spacing_mm: tuple[float, float, float] | float = 1.0,
    lr_fraction: float = 0.4,
    align: bool = True,
    exclude_rim: bool = True,
) -> BodyMeasurement:
    """Heights of a binary vertebral body mask in its own frame, with its tilt.

    Args:
        body_mask: 3D mask of one vertebral body (posterior elements removed), axes
            (height superior->inferior, anterior->posterior, right->left).
        spacing_mm: voxel size per axis, or one number for isotropic voxels.
        lr_fraction: central fraction of the left-right extent to use (0.4 by definition).
        align: measure the antialiased mask in the body's endplate frame (off: the binary mask
            in the crop's axes, whole voxels, the old way).
        exclude_rim: apply the rim rule.
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    mask = np.asarray(body_mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"body mask must be 3D, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("the body mask is empty")
    # two empty voxels round the body on every side (beyond what the smoothing reaches), also where
    # it touches the array's end: resampling reaches its outer faces only through background beyond
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    mask = np.pad(mask[box], 2 + (antialias_margin() if align else 0))
    frame = np.eye(3)
    step = float(spacing.min())
    if align:
        field = antialiased(mask)
        grid, grid_spacing = field, spacing
        for _ in range(2):
            # the second round fits the resampled field where it crosses 0.5, as the columns are
            # measured: a threshold there turned the frame by a degree or two on symmetric bodies
            local = body_frame(grid, grid_spacing)
            frame = local @ frame
            grid = _resample_body(field, spacing, frame, step)
            grid_spacing = np.full(3, step)
        if np.allclose(frame, np.eye(3), atol=1e-6) and np.allclose(spacing, step):
            grid = field
        aligned, aligned_spacing = grid, grid_spacing
    else:
        aligned, aligned_spacing = mask, spacing
    cols = column_heights(aligned, aligned_spacing[0])
    heights = heights_from_columns(cols, lr_fraction, aligned_spacing[1], exclude_rim)
    tilt = float(np.degrees(np.arccos(np.clip(abs(frame[0, 0]), -1.0, 1.0))))
    return BodyMeasurement(heights, tilt, frame)


def body_heights(
    body_mask: np.ndarray,
    spacing_mm: tuple[float, float, float] | float = 1.0,
    lr_fraction: float = 0.4,
    align: bool = True,
    exclude_rim: bool = True,
) -> BodyHeights:
    """Anterior, middle and posterior heights (mm) of a binary vertebral body mask (:func:`measure_body`)."""
    return measure_body(body_mask, spacing_mm, lr_fraction, align, exclude_rim).heights


def height_reduction(healthy: BodyHeights, fractured: BodyHeights) -> np.ndarray:
    """Relative height reduction per region, (healthy - fractured) / healthy."""
    h = healthy.as_array()
    return (h - fractured.as_array()) / h


def genant_grade(max_reduction: float) -> int:
    """Genant grade of the largest relative height reduction.

    0: under 20 %; 1 (mild): 20-25 %; 2 (moderate): 25-40 %; 3 (severe): more than 40 %.
    """
    r = float(max_reduction)
    if not np.isfinite(r):
        raise ValueError(f"height reduction must be finite, got {max_reduction}")
    if r < GENANT_MILD:
        return 0
    if r < GENANT_MODERATE:
        return 1
    if r <= GENANT_SEVERE:
        return 2
    return 3


def genant_from_heights(healthy: BodyHeights, fractured: BodyHeights) -> int:
    """Genant grade from healthy and fractured region heights (largest of the three reductions)."""
    return genant_grade(float(np.nanmax(height_reduction(healthy, fractured))))


# ---------------------------------------------------------------------------------------------
# Heights of a straightened dataset root
# ---------------------------------------------------------------------------------------------

CSV_COLUMNS = (
    "pid",
    "vid",
    "complete",
    "height_anterior_mm",
    "height_middle_mm",
    "height_posterior_mm",
    "tilt_deg",
    "reason",
)


def not_measurable(folder: Path) -> dict[tuple[str, int], str]:
    """{(pid, vid): reason} of the vertebrae the curve jsons under ``folder/curve`` list as cut."""
    out = {}
    for path in sorted((folder / "curve").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        pid = str(record.get("pid", path.stem))
        for vid, reason in record.get("not_measurable", {}).items():
            out[(pid, int(vid))] = str(reason)
    return out


def unmeasured_note(regions: list[str]) -> str:
    """The note for regions the definition could not measure ("" when there are none)."""
    return f"height not measurable: {', '.join(regions)}" if regions else ""


def crop_row(pid: str, vid: int, label: np.ndarray, spacing_mm: np.ndarray) -> dict:
    """One CSV row: the heights and tilt of vertebra ``vid``'s body in its label crop; a region
    the definition cannot measure is an empty cell (as for a cut vertebra, and in rhlv.csv), and
    the reason names it."""
    m = measure_body(label == vid, spacing_mm)
    heights = m.heights.as_dict()
    row = {"pid": pid, "vid": int(vid), "complete": True}
    for region, value in heights.items():
        row[f"height_{region}_mm"] = round(value, 2) if np.isfinite(value) else ""
    row["tilt_deg"] = round(m.tilt_deg, 2)
    row["reason"] = unmeasured_note([r for r, value in heights.items() if not np.isfinite(value)])
    return row


def dataset_rows(dataroot: str | Path, progress: bool = True) -> list[dict]:
    """Rows for every vertebra of a straightened root: measured crops, and the cut ones (no heights)."""
    from data.crops import CropStore

    store = CropStore(dataroot, need_ct=False)
    cut = not_measurable(store.folder)
    rows = []
    for key in tqdm(store.keys(), desc="heights", unit="vertebra", disable=not progress):
        crop = store.load(key)
        if (crop.pid, crop.vid) in cut:
            continue
        if not (crop.label == crop.vid).any():
            cut[(crop.pid, crop.vid)] = "its crop holds no voxel of its label"
            continue
        rows.append(crop_row(crop.pid, crop.vid, crop.label, crop.spacing_mm))
    for (pid, vid), reason in cut.items():
        empty = {f"height_{r}_mm": "" for r in REGIONS}
        rows.append({"pid": pid, "vid": vid, "complete": False, **empty, "tilt_deg": "", "reason": reason})
    return sorted(rows, key=lambda r: (r["pid"], r["vid"]))


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "complete": str(row["complete"]).lower()})
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Heights of every vertebra of a straightened dataset root.")
    parser.add_argument("--dataroot", required=True, help="dataset root (or its straightened/ folder)")
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing CSV")
    return parser


def main(argv: list[str] | None = None) -> int:
    from util.atomic import write_text
    from util.errors import InputError

    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    out = Path(opt.out)
    if out.exists() and not opt.overwrite:
        print(f"{out} exists; pass --overwrite to replace it")
        return 0
    try:
        rows = dataset_rows(opt.dataroot)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {opt.dataroot}: no vertebrae found", file=sys.stderr)
        return 2
    write_text(out, csv_text(rows))
    n_cut = sum(not r["complete"] for r in rows)
    print(
        f"heights: {len(rows) - n_cut} vertebrae measured, {n_cut} not measurable (cut) "
        f"in {time.perf_counter() - start:.1f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

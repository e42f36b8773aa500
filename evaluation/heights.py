"""Vertebral body heights: the one definition used everywhere, and Genant grades from them.

Definition (DESIGN.md): in the vertebra's local frame, with the height axis along the spine,
take the central 40 % of the body's left-right extent; on each of those sagittal planes cut the
body's anterior-posterior extent into thirds; a column's height is the body's extent along the
height axis; a region's height (anterior, middle, posterior) is the median over its columns and
planes, in mm.

Arrays follow the straightened-crop axis order: axis 0 = height (superior to inferior), axis 1 =
anterior to posterior, axis 2 = right to left. :func:`body_heights` measures a binary body mask;
:func:`heights_from_columns` applies the same definition to column heights from any source (the
phantom evaluates it on its analytic geometry), so truth and measurement cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

REGIONS = ("anterior", "middle", "posterior")
# Genant semi-quantitative grade boundaries on the largest relative height reduction.
GENANT_MILD = 0.20
GENANT_MODERATE = 0.25
GENANT_SEVERE = 0.40


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


def heights_from_columns(column_heights_mm: np.ndarray, lr_fraction: float = 0.4) -> BodyHeights:
    """Region heights from a grid of column heights.

    Args:
        column_heights_mm: (AP, LR) array; the body's extent along the height axis for each
            column, NaN (or <= 0) where the column misses the body.
        lr_fraction: the central fraction of the left-right extent whose sagittal planes are used.

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

    planes = np.flatnonzero(present.any(axis=0))
    k0, k1 = planes[0], planes[-1]
    n_lr = k1 - k0 + 1
    pos = (np.arange(k0, k1 + 1) - k0 + 0.5) / n_lr
    keep = np.arange(k0, k1 + 1)[np.abs(pos - 0.5) <= lr_fraction / 2 + 1e-9]
    if keep.size == 0:
        keep = np.array([(k0 + k1) // 2])
    sub = present[:, keep]
    heights = cols[:, keep]

    n_ap = sub.shape[0]
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


def column_heights(body_mask: np.ndarray, height_spacing_mm: float) -> np.ndarray:
    """Each (AP, LR) column's extent along axis 0 in mm (first to last foreground voxel), NaN if empty."""
    mask = np.asarray(body_mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"body mask must be 3D, got shape {mask.shape}")
    n = mask.shape[0]
    has = mask.any(axis=0)
    first = np.argmax(mask, axis=0)
    last = n - 1 - np.argmax(mask[::-1], axis=0)
    return np.where(has, (last - first + 1) * float(height_spacing_mm), np.nan)


def body_heights(
    body_mask: np.ndarray, spacing_mm: tuple[float, float, float] | float = 1.0, lr_fraction: float = 0.4
) -> BodyHeights:
    """Anterior, middle and posterior heights (mm) of a binary vertebral body mask.

    Args:
        body_mask: 3D mask of one vertebral body (posterior elements removed), axes
            (height superior->inferior, anterior->posterior, right->left).
        spacing_mm: voxel size per axis, or one number for isotropic voxels.
        lr_fraction: central fraction of the left-right extent to use (0.4 by definition).
    """
    spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    return heights_from_columns(column_heights(body_mask, spacing[0]), lr_fraction)


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

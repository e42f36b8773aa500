"""Slices through a target vertebra of a straightened crop, and maps put back on the crop's grid.

Pure functions, no I/O. Crop axes: 0 = height (superior->inferior), 1 = anterior->posterior,
2 = right->left. A sagittal slice is taken at a fixed axis-2 index (image: height x AP), a
coronal one at a fixed axis-1 index (image: height x LR). Images go to the network as float in
[0, 1] (the crops are uint8 0-255).
"""

from __future__ import annotations

import numpy as np

PLANE_AXIS = {"sagittal": 2, "coronal": 1}


def plane_axis(plane: str) -> int:
    """The crop axis held fixed by a slice of ``plane``."""
    try:
        return PLANE_AXIS[plane]
    except KeyError:
        raise ValueError(f"plane {plane!r}: expected one of {sorted(PLANE_AXIS)}") from None


def target_slices(label: np.ndarray, vid: int, plane: str, central_fraction: float = 1.0) -> np.ndarray:
    """Indices along the plane's axis of the slices that cut the target vertebra ``vid``.

    Args:
        label: the crop's label array.
        central_fraction: keep only this central share of the target's extent (at least one slice).

    Returns:
        Sorted slice indices (empty when the target is not in the crop).
    """
    axis = plane_axis(plane)
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.any(label == vid, axis=other))
    if present.size == 0 or central_fraction >= 1.0:
        return present
    lo, hi = int(present[0]), int(present[-1])
    keep = max(1, int(round((hi - lo + 1) * central_fraction)))
    start = lo + (hi - lo + 1 - keep) // 2
    return np.arange(start, start + keep)


def take_slices(volume: np.ndarray, indices: np.ndarray, plane: str) -> np.ndarray:
    """The slices ``indices`` of ``volume`` as an (n, H, W) array (H = height axis)."""
    return np.moveaxis(volume, plane_axis(plane), 0)[np.asarray(indices, dtype=np.int64)]


def put_slices(shape: tuple[int, ...], indices: np.ndarray, maps: np.ndarray, plane: str) -> np.ndarray:
    """A float32 volume of ``shape``: ``maps`` (n, H, W) at slices ``indices``, zero elsewhere."""
    out = np.zeros(shape, dtype=np.float32)
    np.moveaxis(out, plane_axis(plane), 0)[np.asarray(indices, dtype=np.int64)] = maps
    return out


def target_centre(label: np.ndarray, vid: int) -> np.ndarray:
    """The target's centroid (voxel indices along the three crop axes); the crop centre when absent."""
    idx = np.nonzero(label == vid)
    if idx[0].size == 0:
        return (np.asarray(label.shape, dtype=np.float64) - 1) / 2
    return np.array([float(np.mean(i)) for i in idx])


def window_slices(
    image_shape: tuple[int, int], centre: tuple[float, float], size: tuple[int, int]
) -> tuple[slice, slice]:
    """Row and column slices of a ``size`` window centred on ``centre``, shifted to stay inside the image."""
    out = []
    for n, c, k in zip(image_shape, centre, size, strict=True):
        k = min(int(k), n)
        start = int(round(c - k / 2))
        start = min(max(start, 0), n - k)
        out.append(slice(start, start + k))
    return out[0], out[1]


def height_band(label: np.ndarray, vid: int) -> tuple[int, int]:
    """First and last row (axis 0) of the target vertebra; (0, -1) when absent."""
    rows = np.flatnonzero(np.any(label == vid, axis=(1, 2)))
    return (int(rows[0]), int(rows[-1])) if rows.size else (0, -1)


def remove_band(images: np.ndarray, band: tuple[int, int]) -> np.ndarray:
    """A copy of (n, H, W) ``images`` with rows ``band[0]..band[1]`` set to zero (the hole)."""
    out = np.array(images, copy=True)
    out[:, band[0] : band[1] + 1] = 0
    return out


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 0-255 images to float32 in [0, 1]."""
    return np.asarray(images, dtype=np.float32) / 255.0


def inside_outside_means(heatmap: np.ndarray, body: np.ndarray, indices: np.ndarray, plane: str):
    """Mean map value inside the target body and outside it, over the slices ``indices``.

    Returns:
        (mean inside, mean outside); NaN for an empty region.
    """
    h = take_slices(heatmap, indices, plane)
    b = take_slices(body, indices, plane).astype(bool)
    inside = float(h[b].mean()) if b.any() else float("nan")
    outside = float(h[~b].mean()) if (~b).any() else float("nan")
    return inside, outside


__all__ = [
    "PLANE_AXIS",
    "height_band",
    "inside_outside_means",
    "plane_axis",
    "put_slices",
    "remove_band",
    "take_slices",
    "target_centre",
    "target_slices",
    "to_unit",
    "window_slices",
]

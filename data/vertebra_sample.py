"""One training or inference sample of a vertebra: the squeezed slice (REFERENCE.md section 3.3).

Pure functions, no I/O. The datasets (``data/aligned_*_dataset.py``) call them on one slice; the
iterative 3D synthesis calls them on every slice of a vertebra at once (all functions take a
stack ``(N, H, W)`` as well as one slice ``(H, W)``).

Rows are crop axis 0 (the height axis, superior to inferior). A sample cuts the target vertebra
out of the slice and pushes the content above and below it apart so that a hole of a fixed
height (``--mask_height_mm`` through the row spacing) separates them, whatever the real height:

    rows [0, band_top)            <- CT rows [x1 - band_top, x1)     (just above the target)
    rows [band_top, band_bottom)  =  the hole (-1 in the CT image, 0 in the masks)
    rows [band_bottom, H)         <- CT rows [x2, x2 + H - band_bottom) (just below)

``x1``/``x2`` are the target's first row and last row + 1 on the slice; the hole is centred on
``(x1 + x2) // 2`` and kept inside the image. A vertebra taller than the hole gets a hole of
its height plus ``margin_rows`` (that sample only), so it is never cut. Rows whose source lies
outside the slice are filled like the hole.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy import ndimage

PLANES: dict[str, int] = {"sagittal": 2, "coronal": 1}
_EIGHT = np.ones((3, 3), dtype=bool)
CT_TO_UNIT = (np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
"""uint8 CT value -> [-1, 1] (``v / 127.5 - 1``)."""


def slice_axis(plane: str) -> int:
    """The crop axis held fixed by a slice of ``plane`` (sagittal 2 = right-left, coronal 1 = AP)."""
    try:
        return PLANES[plane]
    except KeyError:
        raise ValueError(f"unknown plane {plane!r}; use {' or '.join(PLANES)}") from None


def take_slices(volume: np.ndarray, index, plane: str) -> np.ndarray:
    """Slice(s) of a crop ``(H, AP, LR)`` at ``index`` (an int, or a sequence for a stack).

    Returns ``(H, AP)`` for a sagittal and ``(H, LR)`` for a coronal slice; ``(N, H, .)`` for a
    sequence of indices. A copy, so the volume is never modified through it.
    """
    axis = slice_axis(plane)
    out = np.take(np.asarray(volume), index, axis=axis)
    if out.ndim == 3:  # the stack axis first: (N, H, .)
        out = np.moveaxis(out, axis, 0)
    return np.ascontiguousarray(out)


def clean_mask(mask: np.ndarray, min_component_px: float = 0) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``min_component_px`` pixels.

    Accepts one slice ``(H, W)`` or a stack ``(N, H, W)`` (each slice cleaned on its own).
    Returns a new boolean array; the input is not modified.
    """
    mask = np.asarray(mask, dtype=bool)
    if min_component_px <= 1 or not mask.any():
        return mask.copy()
    if mask.ndim == 3:
        return np.stack([clean_mask(m, min_component_px) for m in mask])
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_component_px
    keep[0] = False
    return keep[labels]


def target_extent(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First row ``x1`` and last row + 1 ``x2`` of a mask ``(..., H, W)`` along axis -2.

    Vectorised over leading axes; an empty mask gives ``x1 = x2 = 0``. Returns int64 arrays of
    the leading shape (0-d for one slice).
    """
    rows = np.asarray(mask, dtype=bool).any(axis=-1)
    height = rows.shape[-1]
    present = rows.any(axis=-1)
    x1 = np.argmax(rows, axis=-1)
    x2 = height - np.argmax(rows[..., ::-1], axis=-1)
    return np.where(present, x1, 0).astype(np.int64), np.where(present, x2, 0).astype(np.int64)


def rows_for_mm(length_mm: float, row_spacing_mm: float) -> int:
    """Rows covering ``length_mm`` along the height axis: ``round(length_mm / row_spacing_mm)``.

    The one conversion for the hole (``--mask_height_mm``) and its margin, in training and in
    3D synthesis alike, so both use the same hole.
    """
    if row_spacing_mm <= 0:
        raise ValueError(f"row spacing must be positive, got {row_spacing_mm}")
    return int(round(float(length_mm) / float(row_spacing_mm)))


def hole_band(
    x1, x2, hole_rows: int, image_rows: int, margin_rows: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``[band_top, band_bottom)`` of the hole for targets spanning rows ``[x1, x2)``.

    The hole has ``max(hole_rows, x2 - x1 + margin_rows)`` rows (at most ``image_rows``), is
    centred on ``(x1 + x2) // 2`` and is shifted, not shrunk, to stay inside ``[0, image_rows]``.
    Vectorised over ``x1``/``x2``. Returns int64 ``(band_top, band_bottom, rows)``.
    """
    x1 = np.asarray(x1, dtype=np.int64)
    x2 = np.asarray(x2, dtype=np.int64)
    rows = np.maximum(int(hole_rows), x2 - x1 + int(margin_rows))
    rows = np.minimum(rows, int(image_rows))
    top = (x1 + x2) // 2 - rows // 2
    top = np.clip(top, 0, image_rows - rows)
    return top, top + rows, rows


def squeeze_rows(x1, x2, band_top, band_bottom, image_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Source row of every output row of the squeezed image, and whether it has one.

    Returns ``(src, valid)`` of shape ``(..., image_rows)``: output row ``r`` shows input row
    ``src[r]`` where ``valid[r]``; hole rows and rows whose source is outside the image are not
    valid. Vectorised over the leading shape of ``x1``.
    """
    x1, x2, top, bottom = (np.asarray(v, dtype=np.int64)[..., None] for v in (x1, x2, band_top, band_bottom))
    r = np.arange(image_rows, dtype=np.int64)
    above = r < top
    below = r >= bottom
    src = np.where(above, x1 - top + r, x2 + r - bottom)
    valid = (above | below) & (src >= 0) & (src < image_rows)
    return np.where(valid, src, 0), valid


def shift_rows(image: np.ndarray, src: np.ndarray, valid: np.ndarray, fill: float) -> np.ndarray:
    """Rows of ``image`` ``(..., H, W)`` moved as :func:`squeeze_rows` says; the rest set to ``fill``."""
    image = np.asarray(image)
    lead = image.shape[:-2]
    flat = image.reshape(-1, *image.shape[-2:])
    rows = np.broadcast_to(src, (*lead, image.shape[-2])).reshape(len(flat), -1)
    keep = np.broadcast_to(valid, (*lead, image.shape[-2])).reshape(len(flat), -1)
    out = flat[np.arange(len(flat))[:, None], rows]
    out[~keep] = fill
    return out.reshape(image.shape)


def slice_range(
    label_volume: np.ndarray, vid: int, plane: str, fraction: float = 0.8
) -> tuple[np.ndarray, float, int]:
    """The central slices of the target along the plane's slice axis (REFERENCE.md section 3.2).

    The target's extent ``z0..z1`` is that of its largest 3D connected component (stray
    fragments are ignored); the central ``max(1, int(fraction * n))`` of its ``n`` slices are
    returned with the extent's centre ``(z0 + z1) / 2`` and ``n``. Raises ``ValueError`` if the
    volume holds no voxel of ``vid``.
    """
    axis = slice_axis(plane)
    target = np.asarray(label_volume) == int(vid)
    box = ndimage.find_objects(target.astype(np.uint8))
    if not box or box[0] is None:
        raise ValueError(f"no voxel of vertebra {vid}")
    sub = target[box[0]]
    labels, n_comp = ndimage.label(sub)
    if n_comp > 1:
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        sub = labels == largest
    profile = sub.any(axis=tuple(a for a in range(3) if a != axis))
    hits = np.flatnonzero(profile) + box[0][axis].start
    z0, z1 = int(hits[0]), int(hits[-1])
    n = z1 - z0 + 1
    m = max(1, int(fraction * n))
    start = z0 + (n - m) // 2
    return np.arange(start, start + m, dtype=np.int64), (z0 + z1) / 2.0, n


def slice_weights(slices: np.ndarray, centre: float) -> np.ndarray:
    """Triangular draw weights ``1 - |i - c| / (last - first)``, normalised to sum to 1."""
    slices = np.asarray(slices, dtype=np.float64)
    span = max(float(slices[-1] - slices[0]), 1.0)
    w = np.clip(1.0 - np.abs(slices - centre) / span, 1e-6, None)
    return w / w.sum()


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_unit(*keys: int) -> float:
    """A number in [0, 1) that depends only on the integer ``keys`` (a splitmix64 hash).

    The training slice draw is ``draw_slice(slices, weights, seeded_unit(seed, epoch, index))``:
    the same in every process and in a resumed run, and a few microseconds to compute.
    """
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return (h >> 11) / float(1 << 53)


def draw_slice(slices: np.ndarray, weights: np.ndarray, u: float) -> int:
    """The slice whose cumulative weight interval holds ``u`` in [0, 1) (inverse-CDF sampling)."""
    cdf = np.cumsum(weights)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(slices[min(i, len(slices) - 1)])


def slice_ratio(index, centre: float, n: int) -> np.ndarray:
    """Distance of slice ``index`` from the target's centre: ``|i - c| / n * 2`` (0 = mid-plane)."""
    return np.abs(np.asarray(index, dtype=np.float64) - centre) / max(int(n), 1) * 2.0


def pad_columns(image: np.ndarray, width: int, fill=0) -> tuple[np.ndarray, int, int]:
    """Pad (or crop) the last axis of ``image`` centred to ``width`` columns.

    Returns ``(out, col_start, col_stop)``: the columns of ``out`` that hold ``image``'s data.
    Used for coronal slices (``H x LR``) so both planes give ``H x W`` images.
    """
    image = np.asarray(image)
    cols = image.shape[-1]
    if cols >= width:
        start = (cols - width) // 2
        return np.ascontiguousarray(image[..., start : start + width]), 0, width
    left = (width - cols) // 2
    out = np.full((*image.shape[:-1], width), fill, dtype=image.dtype)
    out[..., left : left + cols] = image
    return out, left, left + cols


def build_sample(
    ct_slice_uint8: np.ndarray,
    label_slice: np.ndarray,
    vid: int,
    hole_rows: int,
    normal_ids: Iterable[int],
    cam_slice: np.ndarray | None = None,
    *,
    margin_rows: int = 0,
    min_component_px: float = 0,
) -> dict[str, np.ndarray]:
    """The arrays of one sample (or of a stack of slices) of vertebra ``vid``.

    Args:
        ct_slice_uint8: CT slice ``(H, W)`` or stack ``(N, H, W)``, uint8 0-255.
        label_slice: VerSe ids on the same grid.
        vid: the target vertebra's id.
        hole_rows: the hole's height in rows (``round(mask_height_mm / row spacing)``).
        normal_ids: ids of the patient's normal vertebrae (the target is excluded here).
        cam_slice: attention map in [0, 1] on the same grid; ``None`` gives zeros.
        margin_rows: rows added to the height of a target taller than ``hole_rows``.
        min_component_px: target components smaller than this are ignored (mask and extent).

    Returns:
        float32 ``ct``, ``ct_masked``, ``hole``, ``target_mask``, ``neighbour_mask``, ``cam``,
        ``cam_target`` of shape ``(1, H, W)`` (``(N, 1, H, W)`` for a stack); ``cam`` is squeezed
        like ``ct_masked`` (zero on the hole rows), ``cam_target`` is the CAM in the frame of ``ct``
        (zeros without ``cam_slice``); float32 ``height`` and int64 ``x1``,
        ``x2``, ``band_top``, ``band_bottom``, ``hole_rows`` of shape ``(1,)`` (``(N, 1)``).
        Raises ``ValueError`` if the target is absent from a slice.
    """
    ct = np.asarray(ct_slice_uint8)
    single = ct.ndim == 2
    ct = ct[None] if single else ct
    labels = np.asarray(label_slice)
    labels = labels[None] if single else labels
    if labels.shape != ct.shape:
        raise ValueError(f"label slice {labels.shape} and CT slice {ct.shape} differ")
    if labels.dtype != np.uint8 and labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError("label ids must lie in 0-255 (VerSe ids)")
    n, height, _ = ct.shape

    target = clean_mask(labels == int(vid), min_component_px)
    x1, x2 = target_extent(target)
    if np.any(x2 <= x1):
        raise ValueError(f"vertebra {vid} is absent from slice(s) {np.flatnonzero(x2 <= x1).tolist()}")
    top, bottom, rows = hole_band(x1, x2, hole_rows, height, margin_rows)
    src, valid = squeeze_rows(x1, x2, top, bottom, height)

    others = [int(v) for v in normal_ids if int(v) != int(vid) and 0 < int(v) < 256]
    neighbour_lut = np.zeros(256, np.float32)
    neighbour_lut[others] = 1.0
    if cam_slice is not None:
        cam_slice = np.asarray(cam_slice)
        cam_slice = cam_slice[None] if single else cam_slice
        if cam_slice.shape != ct.shape:
            raise ValueError(f"CAM slice {cam_slice.shape} and CT slice {ct.shape} differ")
    r = np.arange(height)
    hole = ((r >= top[:, None]) & (r < bottom[:, None])).astype(np.float32)[:, :, None]

    ct_u8 = ct.astype(np.uint8, copy=False)
    out = {
        "ct": CT_TO_UNIT[ct_u8],
        "ct_masked": CT_TO_UNIT[shift_rows(ct_u8, src, valid, 0)],  # 0 -> -1: hole and no source
        "hole": np.ascontiguousarray(np.broadcast_to(hole, ct.shape)),
        "target_mask": target.astype(np.float32),
        "neighbour_mask": neighbour_lut[shift_rows(labels.astype(np.uint8, copy=False), src, valid, 0)],
        "cam": (
            np.zeros(ct.shape, np.float32)
            if cam_slice is None
            else shift_rows(cam_slice, src, valid, 0).astype(np.float32, copy=False)
        ),
        # the CAM on the ground-truth frame of ``ct`` (not squeezed): HGAM's L1 weight on the target rows
        "cam_target": (np.zeros(ct.shape, np.float32) if cam_slice is None else cam_slice.astype(np.float32)),
    }
    out = {k: (v if single else v[:, None]) for k, v in out.items()}
    scalars = {
        "height": (x2 - x1).astype(np.float32),
        "x1": x1,
        "x2": x2,
        "band_top": top,
        "band_bottom": bottom,
        "hole_rows": rows,
    }
    for k, v in scalars.items():
        out[k] = v.reshape(1) if single else v.reshape(n, 1)
    return out


__all__ = [
    "PLANES",
    "build_sample",
    "clean_mask",
    "draw_slice",
    "hole_band",
    "pad_columns",
    "rows_for_mm",
    "seeded_unit",
    "shift_rows",
    "slice_axis",
    "slice_range",
    "slice_ratio",
    "slice_weights",
    "squeeze_rows",
    "take_slices",
    "target_extent",
]

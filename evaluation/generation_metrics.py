"""Image and mask metrics of a synthesis against a reference, slice by slice: pure functions.

A *plane* picks the 2D slices the synthesis worked on: ``sagittal`` slices are at fixed crop axis 2,
``coronal`` ones at fixed axis 1; in every slice rows are crop axis 0 (the height axis).

- Global SSIM/PSNR: the whole slice. Band SSIM/PSNR: the rows the vertebra covers on that slice
  (in the reference and, where given, in the original) across all columns: the part synthesised.
- Dice, IoU and RVD (|V_ref - V_syn| / V_ref) of the target over the *synthesised slices only*
  (the reference counted the whole volume, where the slices it never synthesised are empty).

The crops are uint8 (0-255, a fixed HU window), so the data range of SSIM and PSNR is 255; PSNR of
identical images is capped at ``PSNR_CAP_DB``.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from data.nifti_io import resample_to_grid
from straighten.depedicle import body_mask
from straighten.patient import AIR_HU, window_to_uint8

PLANES = {"sagittal": 2, "coronal": 1}
DATA_RANGE = 255.0
PSNR_CAP_DB = 100.0
IMAGE_METRICS = ("ssim_global", "psnr_global", "ssim_band", "psnr_band")


def plane_slices(volume: np.ndarray, plane: str) -> np.ndarray:
    """The volume as a stack of the plane's slices, (n slices, rows = axis 0, columns)."""
    if plane not in PLANES:
        raise ValueError(f"unknown plane {plane!r}; choose from {tuple(PLANES)}")
    return np.moveaxis(np.asarray(volume), PLANES[plane], 0)


def synthesised_slices(
    target: np.ndarray, synthesis: np.ndarray, plane: str, central_fraction: float = 1.0
) -> np.ndarray:
    """Indices of the slices through ``target`` (its central fraction) that the synthesis wrote.

    A slice counts as written when the synthesised volume is not all zero there (the reference left
    the slices it did not synthesise at 0).
    """
    if not 0 < central_fraction <= 1:
        raise ValueError(f"central fraction must be in (0, 1], got {central_fraction}")
    t = plane_slices(target, plane).any(axis=(1, 2))
    idx = np.flatnonzero(t)
    if idx.size == 0:
        return idx
    n = idx[-1] - idx[0] + 1
    keep = max(1, int(central_fraction * n))
    start = idx[0] + (n - keep) // 2
    chosen = np.arange(start, start + keep)
    chosen = chosen[t[chosen]]
    written = plane_slices(synthesis, plane).any(axis=(1, 2))
    return chosen[written[chosen]]


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """SSIM of two 2D images (window shrunk for small images; NaN under 3 px)."""
    side = min(a.shape)
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return float("nan")
    return float(
        structural_similarity(
            np.asarray(a, dtype=np.float64),
            np.asarray(b, dtype=np.float64),
            data_range=data_range,
            win_size=win,
        )
    )


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """PSNR in dB of two images, capped at ``PSNR_CAP_DB`` (identical images)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if np.array_equal(a, b):
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, peak_signal_noise_ratio(a, b, data_range=data_range)))


def image_metrics(
    reference: np.ndarray,
    synthesis: np.ndarray,
    reference_target: np.ndarray,
    plane: str,
    slices: np.ndarray,
    min_area_px: int = 0,
    original_target: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean global and band SSIM/PSNR over ``slices`` where the reference target covers
    at least ``min_area_px`` pixels. The band is the rows either target covers on the slice."""
    ref, syn = plane_slices(reference, plane), plane_slices(synthesis, plane)
    tgt = plane_slices(reference_target, plane)
    orig = plane_slices(original_target, plane) if original_target is not None else None
    values: dict[str, list[float]] = {k: [] for k in IMAGE_METRICS}
    for s in slices:
        t = tgt[s] if orig is None else tgt[s] | orig[s]
        if tgt[s].sum() < max(min_area_px, 1):
            continue
        rows = np.flatnonzero(t.any(axis=1))
        band = slice(rows[0], rows[-1] + 1)
        values["ssim_global"].append(ssim(ref[s], syn[s]))
        values["psnr_global"].append(psnr(ref[s], syn[s]))
        values["ssim_band"].append(ssim(ref[s][band], syn[s][band]))
        values["psnr_band"].append(psnr(ref[s][band], syn[s][band]))
    out = {k: _nanmean(v) for k, v in values.items()}
    out["n_image_slices"] = len(values["ssim_global"])
    return out


def overlap_metrics(reference: np.ndarray, synthesis: np.ndarray, plane: str, slices: np.ndarray) -> dict:
    """Dice, IoU and RVD of two binary masks over ``slices`` of the plane only."""
    ref = plane_slices(np.asarray(reference, dtype=bool), plane)[slices]
    syn = plane_slices(np.asarray(synthesis, dtype=bool), plane)[slices]
    inter, v_ref, v_syn = (ref & syn).sum(), ref.sum(), syn.sum()
    union = v_ref + v_syn - inter
    return {
        "dice": float(2 * inter / (v_ref + v_syn)) if v_ref + v_syn else float("nan"),
        "iou": float(inter / union) if union else float("nan"),
        "rvd": float(abs(v_ref - v_syn) / v_ref) if v_ref else float("nan"),
    }


def full_height_share(mask: np.ndarray, plane: str, slices: np.ndarray) -> float:
    """Share of a mask's columns that are as tall as the tallest column of their slice.

    A column is one position across the slice (rows are crop axis 0); its height is its number of
    mask voxels. Pooled over every column with a voxel, in ``slices`` of the plane. A box gives 1;
    a real vertebral body, concave and with rounded rims, much less. A synthesis that fills its
    inserted rows flat scores higher than the body it stands for (NaN when the mask is empty there).
    """
    heights = plane_slices(np.asarray(mask, dtype=bool), plane)[slices].sum(axis=1)  # (slices, columns)
    present = heights > 0
    if not present.any():
        return float("nan")
    tallest = heights.max(axis=1, keepdims=True)
    return float((heights == tallest)[present].mean())


def truth_on_crop(
    healthy_hu: np.ndarray,
    healthy_labels: np.ndarray,
    truth_affine: np.ndarray,
    crop_affine: np.ndarray,
    crop_shape: tuple[int, int, int],
    vid: int,
    window_hu: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The true pre-fracture CT and body of vertebra ``vid`` on a crop's grid.

    The healthy CT is resampled through the crop's (true scanner) affine and windowed to 0-255 as
    the straightening does; the healthy label is resampled (nearest) and de-pedicled with the same
    body rule, so it compares with a crop's de-pedicled target.

    Returns:
        (uint8 CT, boolean body mask of ``vid``), both of ``crop_shape``.
    """
    spacing = float(np.sqrt((np.asarray(crop_affine)[:3, :3] ** 2).sum(axis=0)).mean())
    hu = resample_to_grid(healthy_hu, truth_affine, crop_affine, crop_shape, 1, AIR_HU)
    labels = resample_to_grid(healthy_labels, truth_affine, crop_affine, crop_shape, 0)
    return window_to_uint8(hu, *window_hu), body_mask(labels == int(vid), spacing)


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


__all__ = [
    "DATA_RANGE",
    "IMAGE_METRICS",
    "PLANES",
    "PSNR_CAP_DB",
    "full_height_share",
    "image_metrics",
    "overlap_metrics",
    "plane_slices",
    "psnr",
    "ssim",
    "synthesised_slices",
    "truth_on_crop",
]

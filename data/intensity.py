"""Intensity normalisation per modality, to the generators' [-1, 1] range (tanh outputs).

CT: HU are clipped to a window ``[hu_min, hu_max]`` and mapped linearly to [-1, 1]
(:func:`ct_to_unit`); :func:`unit_to_ct` maps back to HU, so synthetic CT is written in HU (values
outside the window are lost, which is the price of a bounded generator output).
MR has no absolute scale: each volume is mapped by its own percentiles (default 0.5 and 99.5 of
the voxels above the volume's minimum, i.e. not counting the zero background), clipped to [-1, 1]
(:func:`mr_to_unit`).
"""

from __future__ import annotations

import numpy as np

CT_WINDOW_HU = (-1024.0, 2048.0)
MR_PERCENTILES = (0.5, 99.5)


def ct_to_unit(
    hu: np.ndarray, hu_min: float = CT_WINDOW_HU[0], hu_max: float = CT_WINDOW_HU[1]
) -> np.ndarray:
    """HU -> [-1, 1] (clipped window)."""
    if hu_max <= hu_min:
        raise ValueError(f"CT window must have hu_max > hu_min, got [{hu_min}, {hu_max}]")
    unit = (np.clip(np.asarray(hu, dtype=np.float32), hu_min, hu_max) - hu_min) / (hu_max - hu_min)
    return (unit * 2.0 - 1.0).astype(np.float32)


def unit_to_ct(
    unit: np.ndarray, hu_min: float = CT_WINDOW_HU[0], hu_max: float = CT_WINDOW_HU[1]
) -> np.ndarray:
    """[-1, 1] -> HU (inverse of :func:`ct_to_unit` inside the window)."""
    unit = np.clip(np.asarray(unit, dtype=np.float32), -1.0, 1.0)
    return ((unit + 1.0) * 0.5 * (hu_max - hu_min) + hu_min).astype(np.float32)


def mr_percentiles(mr: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> tuple[float, float]:
    """The low and high percentiles of an MR volume's foreground (voxels above its minimum)."""
    values = np.asarray(mr, dtype=np.float32)
    foreground = values[values > values.min()]
    if foreground.size == 0:
        return float(values.min()), float(values.min()) + 1.0
    lo, hi = np.percentile(foreground, percentiles)
    return float(lo), float(max(hi, lo + 1e-3))


def mr_to_unit(mr: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> np.ndarray:
    """MR -> [-1, 1] by the volume's own percentiles (clipped)."""
    lo, hi = mr_percentiles(mr, percentiles)
    unit = (np.asarray(mr, dtype=np.float32) - lo) / (hi - lo)
    return (np.clip(unit, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def to_unit(array: np.ndarray, modality: str, hu_window: tuple[float, float] = CT_WINDOW_HU) -> np.ndarray:
    """Normalise a volume of ``modality`` ('ct' or 'mr') to [-1, 1]."""
    if modality == "ct":
        return ct_to_unit(array, *hu_window)
    if modality == "mr":
        return mr_to_unit(array)
    raise ValueError(f"unknown modality {modality!r}; use ct | mr")

"""SHRM height loss: the relative error of a predicted height (REFERENCE.md section 5.6).

Each height head outputs a fraction in (0, 1) of the sample's hole rows; the predicted height in
rows is ``fraction * hole_rows``. The loss is ``mean_b |fraction * hole_rows - h| / h``, with
``h = x2 - x1`` the true height on the slice. The reference used a fixed 40-row hole; a taller
vertebra here gets a taller hole, so the head's scale follows the sample.
"""

from __future__ import annotations

import torch


def relative_height_error(
    fraction: torch.Tensor, hole_rows: torch.Tensor, height: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``|fraction * hole_rows - height| / height``, shape (B,)."""
    f = fraction.float().reshape(-1)
    rows = hole_rows.float().reshape(-1)
    h = height.float().reshape(-1).clamp_min(1.0)
    return (f * rows - h).abs() / h


def height_loss(fraction: torch.Tensor, hole_rows: torch.Tensor, height: torch.Tensor) -> torch.Tensor:
    """Batch mean of :func:`relative_height_error`."""
    return relative_height_error(fraction, hole_rows, height).mean()


ROUNDINGS = ("round", "ceil")


def predicted_rows(fraction: torch.Tensor, hole_rows: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Rows to insert: ``fraction * hole_rows`` rounded up (``ceil``, the reference) or to the nearest
    row (``round``, halves up), at least 1, int64 (no gradient). No floor at the observed height
    (the reference's floor biased heights upwards, defect 6).

    The true height on a slice is a whole number of rows and the loss trains ``fraction *
    hole_rows`` towards it, so an unbiased head scatters on both sides of it; ``ceil`` then adds
    about half a row on average to the inserted height (1 mm at 2 mm rows), ``round`` nothing. The
    3D heights of the iterative synthesis did not follow consistently (README), so ``ceil`` stays
    the default.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    x = fraction.detach().float().reshape(-1) * hole_rows.float().reshape(-1)
    rows = torch.ceil(x) if rounding == "ceil" else torch.floor(x + 0.5)
    return rows.clamp_min(1).long()

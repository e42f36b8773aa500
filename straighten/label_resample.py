"""Resampling a label map onto a crop grid without the staircase of nearest neighbour.

Nearest neighbour puts every surface of a label on the input's voxel faces: a mask of 3 mm
slices resliced at 1 mm keeps 3 mm steps wherever an endplate crosses the slices at an angle,
and a column's height then jumps by a slice. Here each label present near the crop is resampled
on its own as a smooth field and the crop voxel takes the label whose field is highest, where it
is inside:

- ``"linear"``: the label's binary mask, trilinear, inside at 0.5 or more;
- ``"distance"``: the label's signed distance in mm (positive inside, found with the input's
  anisotropic voxel size), trilinear, inside above 0. Where a surface crosses thick slices at an
  angle, the distances to the in-plane step of the next slice place it between the slices, not
  half-way on every column: the staircase becomes a ramp. A surface parallel to the slices stays
  half-way between the last slice inside and the first outside (nothing in a mask says more).
  Counting distances across slices more (to widen the ramp) rounds the bodies' edges and was
  worse on the phantom (85 % -> 79 % of vertebrae within 1.5 mm at 1 x 1 x 3 mm).

Each label's field is computed once on its own bounding box of the input (``LabelFields``
caches it for every crop of the patient) and resampled only on the part of the crop its nearest
neighbour box covers, so memory and time stay those of a few bodies, not of the whole scan.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from data.nifti_io import resample_to_grid, voxel_sizes

log = logging.getLogger(__name__)

MODES = ("nearest", "linear", "distance")

# Input voxels around a label's box: room for its field to fall off.
SOURCE_MARGIN = 2
# A label whose box holds more input voxels (stray islands far apart, very fine scans) is
# resampled by nearest neighbour, which needs no field: memory stays bounded.
MAX_FIELD_VOXELS = 24_000_000


class LabelFields:
    """A label map with one smooth field per label, computed on first use."""

    def __init__(self, labels: np.ndarray, affine: np.ndarray, mode: str = "distance"):
        if mode not in MODES:
            raise ValueError(f"label resampling must be one of {MODES}, got {mode!r}")
        self.labels = labels
        self.affine = np.asarray(affine, dtype=np.float64)
        self.mode = mode
        self.spacing = voxel_sizes(self.affine)
        self.boxes = ndimage.find_objects(labels)
        self._fields: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}

    def field(self, vid: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(field, start index) of label ``vid`` on its padded box of the input; None for a box
        over ``MAX_FIELD_VOXELS``."""
        if vid not in self._fields:
            box = self.boxes[vid - 1]
            if np.prod([b.stop - b.start + 2 * SOURCE_MARGIN for b in box]) > MAX_FIELD_VOXELS:
                log.warning("label %d spans too large a box for a smooth crop; nearest neighbour", vid)
                self._fields[vid] = None
                return None
            lo = np.array([max(0, b.start - SOURCE_MARGIN) for b in box])
            hi = np.array(
                [min(n, b.stop + SOURCE_MARGIN) for b, n in zip(box, self.labels.shape, strict=True)]
            )
            inside = self.labels[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] == vid
            if self.mode == "linear":
                values = inside.astype(np.float32)
            else:
                pad = np.pad(inside, 1)  # the box's edge is outside, even where it meets the scan's edge
                signed = ndimage.distance_transform_edt(
                    pad, sampling=self.spacing
                ) - ndimage.distance_transform_edt(~pad, sampling=self.spacing)
                values = signed[1:-1, 1:-1, 1:-1].astype(np.float32)
            self._fields[vid] = (values, lo)
        return self._fields[vid]

    def resample(self, out_affine: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
        """The label map on the grid ``out_affine``/``out_shape`` (uint8 like the input's ids)."""
        nearest = resample_to_grid(self.labels, self.affine, out_affine, out_shape, 0)
        if self.mode == "nearest":
            return nearest
        out_spacing = voxel_sizes(out_affine)
        margin = int(np.ceil(self.spacing.max() / out_spacing.min())) + 1
        to_input = np.linalg.inv(self.affine) @ np.asarray(out_affine, dtype=np.float64)
        threshold = 0.5 if self.mode == "linear" else 0.0
        best = np.full(out_shape, threshold, dtype=np.float32)
        out = np.zeros(out_shape, dtype=nearest.dtype)
        fallback = []
        for vid, box in enumerate(ndimage.find_objects(nearest), start=1):
            if box is None or self.boxes[vid - 1] is None:
                continue
            field = self.field(vid)
            if field is None:
                fallback.append(vid)
                continue
            obox = tuple(
                slice(max(0, b.start - margin), min(n, b.stop + margin))
                for b, n in zip(box, out_shape, strict=True)
            )
            ostart = np.array([b.start for b in obox], dtype=np.float64)
            values, sstart = field
            cval = 0.0 if self.mode == "linear" else -float(self.spacing.max()) * (SOURCE_MARGIN + 1)
            sub = ndimage.affine_transform(
                values,
                to_input[:3, :3],
                offset=to_input[:3, :3] @ ostart + to_input[:3, 3] - sstart,
                output_shape=tuple(b.stop - b.start for b in obox),
                order=1,
                mode="constant",
                cval=cval,
                prefilter=False,
            )
            region, labels = best[obox], out[obox]
            win = sub > region
            region[win] = sub[win]
            labels[win] = vid
        if fallback:
            keep = (out == 0) & np.isin(nearest, fallback)
            out[keep] = nearest[keep]
        return out

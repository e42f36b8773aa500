"""Vertebra centroids and the centroid json file.

The file keeps the reference format so existing data drops in: a list sorted by label of
``{"label": id, "X": i, "Y": j, "Z": k}``, where X, Y, Z are the mean voxel indices along array
axes 0, 1, 2 of the mask *as stored on disk* (not mm, not world coordinates). Labels are VerSe
ids whatever the mask's own scheme.

Partially visible end vertebrae are left out by a volume threshold in mm³, which keeps the
reference's intent (6000 voxels cranially, 8000 caudally, at its assumed 1 mm³ voxels) at any
voxel size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from data import label_schemes
from util.atomic import read_json, write_json
from util.errors import input_error

log = logging.getLogger(__name__)

MIN_CRANIAL_VOLUME_MM3 = 6000.0
MIN_CAUDAL_VOLUME_MM3 = 8000.0


def vertebra_labels(mask: np.ndarray) -> list[int]:
    """Vertebra ids present in ``mask`` (sacrum, coccyx and background excluded), cranial to caudal."""
    present = np.flatnonzero(np.bincount(np.asarray(mask).ravel().astype(np.int64, copy=False)))
    return label_schemes.sort_spine_order(int(v) for v in present if label_schemes.is_vertebra(v))


# Islands (components of a label apart from its largest) at least this big are logged.
REPORT_ISLAND_MM3 = 100.0


def label_centroids(
    mask: np.ndarray,
    labels: list[int] | None = None,
    voxel_volume_mm3: float | None = None,
    report_island_mm3: float = REPORT_ISLAND_MM3,
) -> dict[int, np.ndarray]:
    """Mean voxel index (axes 0, 1, 2) of the largest connected component of each label.

    Stray islands of a label (a mislabelled blob elsewhere in the scan) do not move its
    centroid; islands of ``report_island_mm3`` or more are logged with their size (in voxels,
    against the same number, when ``voxel_volume_mm3`` is not given).
    """
    unit = "mm3" if voxel_volume_mm3 is not None else "voxels"
    voxel_volume_mm3 = 1.0 if voxel_volume_mm3 is None else float(voxel_volume_mm3)
    labels = vertebra_labels(mask) if labels is None else [int(v) for v in labels]
    boxes = ndimage.find_objects(mask, max_label=max(labels, default=0)) if labels else []
    out: dict[int, np.ndarray] = {}
    for vid in labels:
        box = boxes[vid - 1] if vid - 1 < len(boxes) else None
        if box is None:
            continue
        comps, n = ndimage.label(mask[box] == vid, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(comps.ravel())[1:]
        main = int(np.argmax(sizes)) + 1
        islands = [s * voxel_volume_mm3 for i, s in enumerate(sizes, 1) if i != main]
        big = [v for v in islands if v >= report_island_mm3]
        if big:
            log.warning(
                "label %d (%s): %d island(s) apart from its main part (largest %.0f %s) left out of "
                "its centroid",
                vid,
                label_schemes.vertebra_name(vid),
                len(big),
                max(big),
                unit,
            )
        centre = np.asarray(ndimage.center_of_mass(comps == main), dtype=np.float64)
        out[vid] = centre + [b.start for b in box]
    return out


def label_volumes_mm3(
    mask: np.ndarray, voxel_volume_mm3: float, labels: list[int] | None = None
) -> dict[int, float]:
    """Volume of each label in mm³."""
    labels = vertebra_labels(mask) if labels is None else [int(v) for v in labels]
    counts = np.bincount(mask.ravel().astype(np.int64), minlength=max(labels, default=0) + 1)
    return {vid: float(counts[vid]) * voxel_volume_mm3 for vid in labels}


def complete_vertebrae(
    volumes_mm3: dict[int, float],
    min_cranial_mm3: float = MIN_CRANIAL_VOLUME_MM3,
    min_caudal_mm3: float = MIN_CAUDAL_VOLUME_MM3,
) -> list[int]:
    """Vertebrae in cranial-to-caudal order, without the end ones too small to be whole.

    Only the cranial-most and caudal-most vertebrae are tested, as partial visibility happens
    at the edges of the field of view.
    """
    order = label_schemes.sort_spine_order(volumes_mm3)
    if order and volumes_mm3[order[0]] < min_cranial_mm3:
        order = order[1:]
    if order and volumes_mm3[order[-1]] < min_caudal_mm3:
        order = order[:-1]
    return order


def complete_vertebra_centroids(
    mask: np.ndarray,
    voxel_volume_mm3: float,
    min_cranial_mm3: float = MIN_CRANIAL_VOLUME_MM3,
    min_caudal_mm3: float = MIN_CAUDAL_VOLUME_MM3,
) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """(centroids of the complete vertebrae, volumes in mm³ of the partial ones left out)."""
    volumes = label_volumes_mm3(mask, voxel_volume_mm3)
    kept = complete_vertebrae(volumes, min_cranial_mm3, min_caudal_mm3)
    return label_centroids(mask, kept), {v: vol for v, vol in volumes.items() if v not in kept}


def centroid_records(centroids: dict[int, np.ndarray]) -> list[dict]:
    """The json records, sorted by label."""
    return [
        {"label": int(vid), "X": float(c[0]), "Y": float(c[1]), "Z": float(c[2])}
        for vid, c in sorted(centroids.items())
    ]


def write_centroids(path: str | os.PathLike, centroids: dict[int, np.ndarray]) -> None:
    """Write the centroid json atomically."""
    write_json(path, centroid_records(centroids), indent=4)


def read_centroids(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """Read a centroid json in the reference format; clear errors for anything else."""
    path = Path(path)
    records = read_json(path, "centroid file", "write it with straighten/location_json_local.py")
    if not isinstance(records, list):
        raise input_error(path, "centroid json must be a list of {label, X, Y, Z} records")
    if any(isinstance(r, dict) and "direction" in r for r in records):
        raise input_error(
            path,
            "this is a VerSe centroid file (it has a 'direction' entry, coordinates in another frame); "
            "write the centroid json with straighten/location_json_local.py",
        )
    out: dict[int, np.ndarray] = {}
    for i, rec in enumerate(records):
        try:
            vid = label_schemes.parse_label_id(rec["label"])
            xyz = np.array([float(rec["X"]), float(rec["Y"]), float(rec["Z"])])
        except (TypeError, KeyError, ValueError) as exc:
            raise input_error(
                path, f"record {i} is not {{label, X, Y, Z}} with numbers ({exc}): {rec!r}"
            ) from exc
        if not np.all(np.isfinite(xyz)):
            raise input_error(path, f"record {i} (label {vid}) has non-finite coordinates")
        if vid in out:
            raise input_error(path, f"label {vid} is listed twice")
        out[vid] = xyz
    return out

"""Vertebra centroids and the centroid json file.

The file keeps the reference format so existing data drops in: a list sorted by label of
``{"label": id, "X": i, "Y": j, "Z": k}``, where X, Y, Z are the mean voxel indices along array
axes 0, 1, 2 of the mask *as stored on disk* (not mm, not world coordinates). Labels are VerSe
ids whatever the mask's own scheme.

Every vertebra present is listed; each record also carries ``"complete": true|false`` and, when
false, ``"reason"`` (extra keys keep the reference's readers working). A vertebra is incomplete
when its *body* is cut by the edge of the scan, found from the geometry (:func:`body_cut_by_fov`:
the body, found by de-pedicling along a coarse spine curve, reaches the array's border in any
direction; the planes turned about the spine by the vertebrae's median anatomical turn,
:func:`straighten.curve.patient_posterior`, so that in a patient turned in the scanner a
transverse process cut by a narrow field of view is not taken for the body), when its body is cut
by another vertebra's label (:func:`body_cut_by_label`: it
touches that label over half its cross-section with no disc between), or when it is an end
vertebra below the volume thresholds in mm³ (the reference's
6000 voxels cranially and 8000 caudally at its assumed 1 mm³ voxels; options, kept as a second
test). Posterior elements cut by a narrow lateral field of view do not make a vertebra incomplete.
A cut vertebra keeps its centroid (the spine curve uses it; it stays a neighbour in other crops)
but gets no crop, height, RHLV or grade.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from data import label_schemes
from data.nifti_io import voxel_sizes, voxel_to_world, world_to_voxel
from util.atomic import read_json, write_json
from util.errors import input_error

log = logging.getLogger(__name__)

MIN_CRANIAL_VOLUME_MM3 = 6000.0
MIN_CAUDAL_VOLUME_MM3 = 8000.0
# Grid of the coarse straightening used to find the bodies: voxel size (at least the mask's finest
# spacing) and plane size in mm.
COMPLETENESS_STEP_MM = 2.0
COMPLETENESS_PLANE_MM = 160.0
# A body with at least this area (mm², counted in straightened voxels) on a face of the array is cut.
MIN_CUT_CONTACT_MM2 = 20.0
# A body touching another vertebra's label over this fraction of its cross-section is cut by it.
MIN_LABEL_CONTACT_FRACTION = 0.5
# Labels smaller than this fraction of the median vertebra are fragments: not used for the curve.
MIN_CURVE_VOLUME_FRACTION = 0.1
# An end vertebra whose centroid step to its neighbour lies within this angle (degrees) of the
# anterior-posterior axis is its posterior elements left by the scan's edge (on 0007 cut through
# its posterior elements: 16-21 deg; steps between whole vertebrae: 74-81 deg).
MAX_END_STEP_AP_DEG = 45.0
# ... and holds under this fraction of the median vertebra's volume: posterior elements alone are a
# part of a vertebra, so a whole one (an extreme lordosis or listhesis) keeps steering the curve.
MAX_REMNANT_VOLUME_FRACTION = 0.6


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


@dataclass(frozen=True)
class Completeness:
    """Whether a vertebra can be measured; ``reason`` says why not."""

    complete: bool
    reason: str | None = None


def edge_distance_mm(shape: tuple[int, ...], spacing_mm: np.ndarray) -> np.ndarray:
    """Per voxel, the distance (mm) along the array axes to the nearest face of the array."""
    dist = np.full(shape, np.inf, dtype=np.float32)
    for axis, n in enumerate(shape):
        i = np.arange(n)
        d = (np.minimum(i, n - 1 - i) * float(spacing_mm[axis])).astype(np.float32)
        view = [1] * len(shape)
        view[axis] = n
        np.minimum(dist, d.reshape(view), out=dist)
    return dist


def _face_direction(ijk: np.ndarray, shape: tuple[int, ...], affine: np.ndarray) -> str:
    """Anatomical name (cranial, caudal, right, left, anterior, posterior) of the array faces at ``ijk``."""
    names = {0: ("left", "right"), 1: ("posterior", "anterior"), 2: ("caudal", "cranial")}  # RAS+
    found = []
    for axis, n in enumerate(shape):
        for side, at in ((-1, ijk[:, axis] <= 0), (1, ijk[:, axis] >= n - 1)):
            if at.any():
                normal = side * affine[:3, axis]
                world = int(np.argmax(np.abs(normal)))
                found.append((int(at.sum()), names[world][int(normal[world] > 0)]))
    found.sort(reverse=True)
    return "/".join(dict.fromkeys(name for _, name in found)) or "unknown"


def curve_labels(volumes_mm3: dict[int, float], centres_mm: dict[int, np.ndarray] | None = None) -> list[int]:
    """The vertebrae large enough to steer a spine curve (not fragments at the scan's edge), in order.

    With ``centres_mm`` (world centroids), an end vertebra under ``MAX_REMNANT_VOLUME_FRACTION``
    of the median volume whose step to its neighbour runs more along the anterior-posterior axis
    than across it (within ``MAX_END_STEP_AP_DEG``) is left out too, while two or more remain (a
    scan left with one body and such a remnant gives that body alone, too few for a curve): what
    the scan's edge left of it is its posterior elements, behind its neighbour, not a vertebra
    stacked on the spine, and a curve through it would run along the AP axis (refused as a wrong
    orientation).
    """
    if not volumes_mm3:
        return []
    typical = float(np.median(list(volumes_mm3.values())))
    order = label_schemes.sort_spine_order(
        v for v, vol in volumes_mm3.items() if vol >= MIN_CURVE_VOLUME_FRACTION * typical
    )
    if centres_mm is not None:
        order = [v for v in order if v in centres_mm]

        def remnant(end: int, neighbour: int) -> bool:
            small = volumes_mm3[end] < MAX_REMNANT_VOLUME_FRACTION * typical
            return small and _runs_along_ap(centres_mm[end], centres_mm[neighbour])

        while len(order) >= 2 and remnant(order[0], order[1]):
            order = order[1:]
        while len(order) >= 2 and remnant(order[-1], order[-2]):
            order = order[:-1]
    return order


def _runs_along_ap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether the step from world point ``a`` to ``b`` lies within ``MAX_END_STEP_AP_DEG`` of the
    anterior-posterior (world y) axis."""
    step = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    norm = float(np.linalg.norm(step))
    return norm > 0 and abs(step[1]) / norm > np.cos(np.deg2rad(MAX_END_STEP_AP_DEG))


def world_centroids(mask: np.ndarray, affine: np.ndarray, labels: list[int]) -> dict[int, np.ndarray]:
    """World centroid (mm) of the largest part of each of ``labels``."""
    centres = label_centroids(mask, labels)
    return {v: voxel_to_world(affine, c) for v, c in centres.items()}


@dataclass
class StraightenedBodies:
    """The mask straightened (nearest neighbour, ``step_mm``) along the polyline through its
    centroids, its bodies found by de-pedicling, and where each straightened voxel came from."""

    labels: np.ndarray  # (rows, n, n) straightened labels
    bodies: np.ndarray  # the same, each vertebra reduced to its body
    on_face: np.ndarray  # True on body voxels with their own label on a face of the array within a step
    curve: object
    step_mm: float

    def to_voxels(self, idx: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """Source voxel indices (rounded) of straightened indices ``idx`` (k, 3)."""
        n = self.labels.shape[1]
        rows, ap, lr = idx.T
        world = (
            self.curve.points[rows]
            + ((ap - n // 2) * self.step_mm)[:, None] * self.curve.ap[rows]
            + ((lr - n // 2) * self.step_mm)[:, None] * self.curve.lr[rows]
        )
        return np.rint(world_to_voxel(affine, world)).astype(np.int64)


def straightened_bodies(
    mask: np.ndarray, affine: np.ndarray, labels: list[int], step_mm: float = COMPLETENESS_STEP_MM
) -> StraightenedBodies:
    """Straighten ``mask`` coarsely along the polyline through the centroids of ``labels`` (two
    or more) and find each vertebra's body there."""
    # imported here: the curve and de-pedicling modules sit above this one
    from data.nifti_io import Volume
    from straighten.curve import MIN_PATIENT_TURN_DEG, patient_polyline, straighten
    from straighten.depedicle import depedicle

    spacing = voxel_sizes(affine)
    step = max(float(step_mm), float(spacing.min()))
    centres = label_centroids(mask, labels)
    world = voxel_to_world(affine, np.array([centres[v] for v in labels]))
    # a patient turned in the scanner: the planes turn with the anatomy, or de-pedicling would keep
    # a transverse process, cut by a narrow field of view, with the body
    curve, turn = patient_polyline(
        Volume(mask, affine), dict(zip(labels, world, strict=True)), step, 40.0, step
    )
    if abs(turn) >= MIN_PATIENT_TURN_DEG:
        log.info(
            "the patient is turned %.1f deg about the spine; completeness is found in its own frame", turn
        )
    n = int(round(COMPLETENESS_PLANE_MM / step))
    along = straighten(mask, affine, curve, (n, n), order=0)
    bodies = depedicle(along, step)
    # a body voxel is on a face when its own label lies on a face of the array within one step of
    # it: its centre sample alone misses a face whose layer of source voxels (thinner than a step)
    # falls between its row and the next one, outside the array
    idx = np.argwhere(bodies > 0)
    rows = idx[:, 0]
    points = (
        curve.points[rows]
        + ((idx[:, 1] - n // 2) * step)[:, None] * curve.ap[rows]
        + ((idx[:, 2] - n // 2) * step)[:, None] * curve.lr[rows]
    )
    axes = np.stack([curve.tangent[rows], curve.ap[rows], curve.lr[rows]], axis=1)
    on_face = np.zeros(along.shape, dtype=bool)
    hit = own_label_on_face(points, axes, bodies[tuple(idx.T)], mask, affine, step)
    on_face[tuple(idx[hit].T)] = True
    return StraightenedBodies(along, bodies, on_face, curve, step)


def subvoxel_offsets(step_mm: float, source_mm: float) -> np.ndarray:
    """Offsets (k, 3) in mm along the three axes of a grid of ``step_mm`` voxels, out to the next
    voxel centre along each axis and at most ``source_mm`` apart, so that a layer of source voxels
    ``source_mm`` thick between two voxel centres is never missed."""
    k = max(1, int(np.ceil(step_mm / source_mm)))
    along = [j * step_mm / k for j in range(-k, k + 1) if j != 0]
    out = [np.zeros(3)]
    for axis in range(3):
        for d in along:
            o = np.zeros(3)
            o[axis] = d
            out.append(o)
    return np.array(out)


def own_label_on_face(
    points_mm: np.ndarray,
    axes: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    step_mm: float,
) -> np.ndarray:
    """For samples (k, 3 world mm) of a grid of ``step_mm`` voxels with unit axes ``axes`` ((k, 3, 3)
    or (3, 3), one axis per row) holding ``labels``, whether their own label lies on a face of
    ``mask``'s array within one step of them along an axis (the nearest voxel to a moved sample is
    on the array's first or last index along some axis and holds that label)."""
    spacing = voxel_sizes(affine)
    last = np.asarray(mask.shape) - 1
    hit = np.zeros(len(points_mm), dtype=bool)
    for offset in subvoxel_offsets(step_mm, float(spacing.min())):
        moved = points_mm + np.einsum("j,...jd->...d", offset, axes)
        ijk = np.floor(world_to_voxel(affine, moved.reshape(-1, 3)) + 0.5).astype(np.int64)
        inside = np.all((ijk >= 0) & (ijk <= last), axis=1)
        on_face = inside & np.any((ijk == 0) | (ijk == last), axis=1)
        at = ijk[on_face]
        hit[on_face] |= mask[at[:, 0], at[:, 1], at[:, 2]] == labels[on_face]
    return hit & (labels > 0)


def snap_to_face(ijk: np.ndarray, shape: tuple[int, ...], spacing_mm: np.ndarray) -> np.ndarray:
    """Voxel indices moved onto the nearest face of the array (mm), clipped into it."""
    ijk = np.clip(np.asarray(ijk, dtype=np.int64), 0, np.asarray(shape) - 1)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    dist = np.concatenate([ijk * sp, (np.asarray(shape) - 1 - ijk) * sp], axis=1)  # (k, 6)
    face = np.argmin(dist, axis=1)
    out = ijk.copy()
    rows = np.arange(len(out))
    axis = face % 3
    out[rows, axis] = np.where(face < 3, 0, np.asarray(shape)[axis] - 1)
    return out


def body_cut_by_fov(
    mask: np.ndarray,
    affine: np.ndarray,
    labels: list[int] | None = None,
    step_mm: float = COMPLETENESS_STEP_MM,
    min_contact_mm2: float = MIN_CUT_CONTACT_MM2,
    straightened: StraightenedBodies | None = None,
) -> dict[int, str]:
    """Vertebrae whose body reaches the edge of the scan, with the reason.

    The mask is straightened (nearest neighbour, ``step_mm``) along the polyline through the
    label centroids and de-pedicled, which finds each body whatever the orientation; each body
    voxel carries the distance of its source voxel to the array's faces. A body with at least
    ``min_contact_mm2`` of voxels on a face is cut there. A single vertebra, which has no curve,
    is cut if its label reaches a face at all. ``straightened`` reuses a straightening of the
    same labels.

    Returns:
        {vertebra id: reason} for the cut ones.
    """
    labels = vertebra_labels(mask) if labels is None else [int(v) for v in labels]
    if not labels:
        return {}
    spacing = voxel_sizes(affine)
    out: dict[int, str] = {}
    volumes = label_volumes_mm3(mask, float(np.prod(spacing)), labels)
    typical = float(np.median(list(volumes.values())))
    steering = curve_labels(volumes, world_centroids(mask, affine, labels))
    big = set(curve_labels(volumes))
    for v in labels:  # a sliver: its centroid would bend the curve, and it has no body to measure
        if v not in steering and v not in big:
            out[v] = f"only a fragment is in the scan ({volumes[v]:.0f} mm3, median {typical:.0f} mm3)"
        elif v not in steering:
            out[v] = (
                f"only a fragment is in the scan ({volumes[v]:.0f} mm3, its posterior elements: its "
                "centroid lies behind its neighbour's, not above or below it)"
            )
    labels = [v for v in labels if v not in out]
    if len(labels) < 2:
        edge = edge_distance_mm(mask.shape, spacing)
        for v in labels:
            ijk = np.argwhere((mask == v) & (edge == 0))
            if len(ijk):
                out[v] = f"cut by the scan's {_face_direction(ijk, mask.shape, affine)} edge"
        return out
    sb = straightened or straightened_bodies(mask, affine, labels, step_mm)
    min_voxels = max(1, int(np.ceil(min_contact_mm2 / sb.step_mm**2)))
    for v in labels:
        contact = (sb.bodies == v) & sb.on_face
        if int(contact.sum()) >= min_voxels:
            if not body_cut_in_own_frame(mask, affine, v, sb, min_voxels):
                log.info("label %d: its body reaches the scan's edge only in the curve's frame", v)
                continue
            ijk = snap_to_face(sb.to_voxels(np.argwhere(contact), affine), mask.shape, spacing)
            out[v] = f"body cut by the scan's {_face_direction(ijk, mask.shape, affine)} edge"
    return out


def body_cut_in_own_frame(
    mask: np.ndarray, affine: np.ndarray, vid: int, sb: StraightenedBodies, min_voxels: int
) -> bool:
    """Whether ``vid``'s body still reaches a face of the array (``min_voxels`` or more) when it
    is de-pedicled in its own frame (:func:`straighten.curve.anatomical_ap`), not the curve's.

    A vertebra turned against the rest of the spine (a rotated scoliotic one) has its transverse
    process in front of the curve's posterior wall; cut by a narrow field of view, the process
    would pass for a cut body. Without an anatomical frame, or within 2 degrees of the curve's,
    the curve's verdict stands (True).
    """
    from data.nifti_io import Volume, resample_to_grid
    from straighten.curve import AP_BOX_MM, anatomical_ap, crop_affine, frame_at, turn_deg
    from straighten.depedicle import body_mask

    centre = voxel_to_world(affine, label_centroids(mask, [vid])[vid])
    row = sb.curve.project(centre)
    found = anatomical_ap(Volume(mask, affine), vid, sb.curve, row, sb.step_mm)
    _, tangent, ap, _ = frame_at(sb.curve, row)
    if found.ap is None or abs(turn_deg(tangent, ap, found.ap)) < 2.0:
        return True
    shape = tuple(max(1, int(round(b / sb.step_mm))) for b in AP_BOX_MM)
    box = crop_affine(sb.curve, row, shape, found.ap, sb.step_mm)
    body = body_mask(resample_to_grid(mask, affine, box, shape, 0) == vid, sb.step_mm)
    idx = np.argwhere(body)
    points = idx @ box[:3, :3].T + box[:3, 3]
    axes = box[:3, :3].T / sb.step_mm
    touching = own_label_on_face(points, axes, np.full(len(idx), vid), mask, affine, sb.step_mm)
    return int(touching.sum()) >= min_voxels


def body_cut_by_label(
    sb: StraightenedBodies, labels: list[int], min_fraction: float = MIN_LABEL_CONTACT_FRACTION
) -> dict[int, str]:
    """Vertebrae whose body is cut by another vertebra's label, with the reason.

    Bodies are kept apart by their discs; a body that touches another vertebra's label over at
    least ``min_fraction`` of its own mean cross-section (its volume over its height, in the
    straightened frame) has lost part of itself to that label, or holds part of it: both are
    flagged. Contact is counted on the faces between voxels of the coarse straightening.
    """
    out: dict[int, str] = {}
    others = np.isin(sb.labels, [*labels, label_schemes.SACRUM])
    for v in labels:
        body = sb.bodies == v
        if not body.any():
            continue
        rows = np.flatnonzero(body.any(axis=(1, 2)))
        section = body.sum() / (rows[-1] - rows[0] + 1)  # voxels per row: the mean cross-section
        touching = np.zeros(256, dtype=np.int64)
        for axis in range(3):
            lo = tuple(slice(None, -1) if k == axis else slice(None) for k in range(3))
            hi = tuple(slice(1, None) if k == axis else slice(None) for k in range(3))
            for here, there in ((lo, hi), (hi, lo)):
                hit = body[here] & others[there] & (sb.labels[there] != v)
                touching += np.bincount(sb.labels[there][hit].astype(np.int64), minlength=256)[:256]
        touched = {int(w): int(c) for w, c in enumerate(touching) if c}
        for w, count in touched.items():
            if count >= min_fraction * section:
                area = count * sb.step_mm**2
                for a, b in ((v, w), (w, v)):
                    if a not in labels:
                        continue
                    out.setdefault(
                        a,
                        f"body cut by the label of {label_schemes.vertebra_name(b)} ({b}): they touch over "
                        f"{area:.0f} mm2 with no disc between",
                    )
    return out


def vertebra_completeness(
    mask: np.ndarray,
    affine: np.ndarray,
    min_cranial_mm3: float = MIN_CRANIAL_VOLUME_MM3,
    min_caudal_mm3: float = MIN_CAUDAL_VOLUME_MM3,
    min_contact_mm2: float = MIN_CUT_CONTACT_MM2,
    min_label_contact_fraction: float = MIN_LABEL_CONTACT_FRACTION,
) -> dict[int, Completeness]:
    """Completeness of every vertebra of ``mask``: its body cut by the scan's edge or by another
    vertebra's label (geometry, :func:`body_cut_by_fov`, :func:`body_cut_by_label`; 0 turns the
    latter off), or an end vertebra below the volume thresholds (mm³)."""
    volumes = label_volumes_mm3(mask, float(np.prod(voxel_sizes(affine))))
    out = {v: Completeness(True) for v in volumes}
    kept = complete_vertebrae(volumes, min_cranial_mm3, min_caudal_mm3)
    for v in volumes:
        if v not in kept:
            out[v] = Completeness(False, f"end vertebra of {volumes[v]:.0f} mm3, below the volume threshold")
    steering = curve_labels(volumes, world_centroids(mask, affine, list(volumes)))
    sb = straightened_bodies(mask, affine, steering) if len(steering) >= 2 else None
    if sb is not None and min_label_contact_fraction > 0:
        for v, reason in body_cut_by_label(sb, steering, min_label_contact_fraction).items():
            out[v] = Completeness(False, reason)
    cut = body_cut_by_fov(mask, affine, list(volumes), min_contact_mm2=min_contact_mm2, straightened=sb)
    for v, reason in cut.items():
        out[v] = Completeness(False, reason)
    return out


def centroid_records(
    centroids: dict[int, np.ndarray], completeness: dict[int, Completeness] | None = None
) -> list[dict]:
    """The json records, sorted by label; ``complete`` (and ``reason`` when false) on each."""
    records = []
    for vid, c in sorted(centroids.items()):
        state = (completeness or {}).get(int(vid), Completeness(True))
        rec = {"label": int(vid), "X": float(c[0]), "Y": float(c[1]), "Z": float(c[2])}
        rec["complete"] = bool(state.complete)
        if not state.complete:
            rec["reason"] = state.reason or "not measurable"
        records.append(rec)
    return records


def write_centroids(
    path: str | os.PathLike,
    centroids: dict[int, np.ndarray],
    completeness: dict[int, Completeness] | None = None,
) -> None:
    """Write the centroid json atomically."""
    write_json(path, centroid_records(centroids, completeness), indent=4)


def read_completeness(path: str | os.PathLike) -> dict[int, Completeness] | None:
    """``complete``/``reason`` of each record of a centroid json; None for a file in the
    reference's format (no record says), whose completeness must be found from the mask."""
    path = Path(path)
    records = read_json(path, "centroid file", "write it with straighten/location_json_local.py")
    if not any(isinstance(r, dict) and "complete" in r for r in records if isinstance(records, list)):
        return None
    out: dict[int, Completeness] = {}
    for rec in records if isinstance(records, list) else []:
        if isinstance(rec, dict) and "label" in rec:
            complete = rec.get("complete", True)
            if not isinstance(complete, bool):
                raise input_error(path, f"label {rec['label']}: 'complete' must be true or false")
            out[int(rec["label"])] = Completeness(complete, None if complete else rec.get("reason"))
    return out


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

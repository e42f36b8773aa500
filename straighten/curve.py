"""The spine curve and straightened resampling, in millimetres.

A smoothing spline is fitted through the vertebra centroids (world mm, cranial to caudal),
parametrised by arc length, sampled every ``step_mm`` and extended straight beyond the end
vertebrae so that every crop can be centred on its target. Each sample carries a frame:

* ``tangent``: along the spine, towards inferior;
* ``ap``: the patient's posterior direction with its tangential part removed, so each plane's
  axis 1 runs anterior to posterior and the frame never twists about the curve (a crop of one
  vertebra may turn it about the tangent to the vertebra's own anatomy: :func:`crop_affine`);
* ``lr``: ``tangent x ap``, towards the patient's left.

:func:`straighten` samples any volume (CT linearly, labels by nearest neighbour) on the planes
perpendicular to a curve, going through the volume's affine, so reorientation and resampling to
``step_mm`` happen in one interpolation. Along the whole curve this bends the anatomy: with a
lordosis of radius 150 mm, a body whose centre lies 15 mm off the curve is stretched on one side
and shrunk on the other by about 10 %. Per-vertebra crops therefore use :func:`crop_affine`: the
planes perpendicular to the curve at the vertebra, one rigid reslice with a true world affine.

A vertebra's crop may turn its planes' axes about the tangent to the vertebra's own anatomy
(:func:`anatomical_ap`): from its body's centroid to its spinal canal (the hole its arch closes
in its axial projection), or to the centroid of its posterior elements where the arch is open.
A patient turned in the scanner, or a rotated scoliotic vertebra, then still gets crops whose
axis 1 runs from body to canal and whose axis 2 is its own left-right, which de-pedicling
(``straighten/depedicle.py``: a midline band, the canal behind the body) relies on.
:func:`patient_posterior` turns the whole curve's reference posterior by the vertebrae's median
turn, for a frame that follows a turned patient and still never twists; :func:`patient_polyline`
is the coarse curve in that frame on which the vertebral bodies are first found.

Why not the ``straighten`` package (neuro-ml; the reference vendors a copy): it samples the
polyline through the centroids (straight segments between vertebrae), works along the array
axes (per-axis spacing, but no affine, so no oblique or flipped scans), and its default frame
(Frenet-Serret) can twist about the curve. A spline in world mm with a posterior-anchored frame,
on scipy, replaces it in a few dozen lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import interpolate, ndimage

from data.nifti_io import Volume, resample_to_grid, world_to_voxel
from straighten.depedicle import body_mask

# RAS+: the patient's posterior is -y.
POSTERIOR = np.array([0.0, -1.0, 0.0])
# The curve may not come closer than this to the anterior-posterior axis (degrees).
MIN_ANGLE_TO_AP_DEG = 20.0


@dataclass
class SpineCurve:
    """Samples of the curve every ``step_mm`` with their frames; row ``origin_row`` is arc length 0."""

    points: np.ndarray  # (N, 3) world mm
    tangent: np.ndarray  # (N, 3) unit, towards inferior
    ap: np.ndarray  # (N, 3) unit, towards posterior
    lr: np.ndarray  # (N, 3) unit, towards left
    step_mm: float
    origin_row: int  # the row of the first control point

    def __len__(self) -> int:
        return len(self.points)

    def project(self, point_mm: np.ndarray) -> float:
        """Continuous row index of the curve point closest to ``point_mm``."""
        d = np.linalg.norm(self.points - point_mm, axis=1)
        k = int(np.argmin(d))
        offset = float(np.dot(point_mm - self.points[k], self.tangent[k])) / self.step_mm
        return float(np.clip(k + offset, 0, len(self) - 1))


def frames(tangent: np.ndarray, posterior: np.ndarray = POSTERIOR) -> tuple[np.ndarray, np.ndarray]:
    """AP and LR unit vectors for unit tangents (N, 3)."""
    cos = np.abs(tangent @ posterior)
    if np.any(cos > np.cos(np.deg2rad(MIN_ANGLE_TO_AP_DEG))):
        raise ValueError(
            "the spine curve runs along the anterior-posterior axis; the image orientation looks wrong"
        )
    ap = posterior[None, :] - (tangent @ posterior)[:, None] * tangent
    ap /= np.linalg.norm(ap, axis=1, keepdims=True)
    lr = np.cross(tangent, ap)
    return ap, lr


def fit_spine_curve(
    control_mm: np.ndarray,
    step_mm: float = 1.0,
    extend_mm: float = 0.0,
    smoothing_mm: float = 1.0,
    posterior: np.ndarray = POSTERIOR,
    degree: int = 3,
) -> SpineCurve:
    """Fit the curve through control points (K, 3) in world mm, ordered cranial to caudal.

    Args:
        control_mm: vertebra centroids, at least two.
        step_mm: arc length between samples (the straightened voxel size along the spine).
        extend_mm: straight extension beyond the first and last control points.
        smoothing_mm: root-mean-square distance the spline may keep from the control points
            (0 interpolates them exactly).
        posterior: the patient's posterior direction in world coordinates.
        degree: 3 for the smoothing spline (cubic, or lower with fewer points); 1 for the
            polyline through the points, which cannot overshoot past an odd end point.
    """
    pts = np.asarray(control_mm, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 2:
        raise ValueError(f"need at least two control points (K, 3), got shape {pts.shape}")
    if step_mm <= 0:
        raise ValueError(f"step_mm must be positive, got {step_mm}")
    chord = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    if np.any(np.diff(chord) < 1e-6):
        raise ValueError("two control points coincide")

    if len(pts) == 2 or degree == 1:
        fine_s = np.linspace(0.0, chord[-1], max(int(chord[-1] / 0.1), 2) + 1)
        fine = np.stack([np.interp(fine_s, chord, pts[:, axis]) for axis in range(3)], axis=1)
        segment = np.clip(np.searchsorted(chord, fine_s, side="right") - 1, 0, len(pts) - 2)
        directions = np.diff(pts, axis=0) / np.diff(chord)[:, None]
        fine_t = directions[segment]
    else:
        k = min(3, len(pts) - 1)
        tck, _ = interpolate.splprep(pts.T, u=chord, k=k, s=len(pts) * smoothing_mm**2)
        u = np.linspace(0.0, chord[-1], max(int(chord[-1] / 0.1), 2) + 1)
        fine = np.array(interpolate.splev(u, tck)).T
        fine_t = np.array(interpolate.splev(u, tck, der=1)).T
        fine_t /= np.linalg.norm(fine_t, axis=1, keepdims=True)
        fine_s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(fine, axis=0), axis=1))]
    length = fine_s[-1]

    ext_rows = int(np.ceil(extend_mm / step_mm))
    n_inner = int(np.floor(length / step_mm + 1e-9)) + 1
    s = (np.arange(n_inner + 2 * ext_rows) - ext_rows) * step_mm
    inner = (s >= 0) & (s <= length)
    points = np.empty((len(s), 3))
    tangent = np.empty((len(s), 3))
    for axis in range(3):
        points[inner, axis] = np.interp(s[inner], fine_s, fine[:, axis])
        tangent[inner, axis] = np.interp(s[inner], fine_s, fine_t[:, axis])
    tangent[inner] /= np.linalg.norm(tangent[inner], axis=1, keepdims=True)
    t0, t1 = fine_t[0], fine_t[-1]
    before, after = s < 0, s > length
    points[before] = fine[0] + s[before, None] * t0
    points[after] = fine[-1] + (s[after, None] - length) * t1
    tangent[before], tangent[after] = t0, t1
    ap, lr = frames(tangent, np.asarray(posterior, dtype=np.float64))
    return SpineCurve(points, tangent, ap, lr, float(step_mm), ext_rows)


def plane_offsets(plane_shape: tuple[int, int], step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """In-plane offsets (mm) of the AP and LR grid lines; the curve sits at index ``n // 2``."""
    n_ap, n_lr = plane_shape
    return (np.arange(n_ap) - n_ap // 2) * step_mm, (np.arange(n_lr) - n_lr // 2) * step_mm


def straighten(
    array: np.ndarray,
    affine: np.ndarray,
    curve: SpineCurve,
    plane_shape: tuple[int, int],
    order: int,
    cval: float = 0.0,
    rows: slice | None = None,
    chunk_rows: int = 16,
) -> np.ndarray:
    """Resample ``array`` on the planes of ``curve``: shape (rows, n_ap, n_lr).

    Axis 0 runs along the curve (superior to inferior), axis 1 anterior to posterior, axis 2
    right to left; voxels are ``curve.step_mm`` apart in every direction. Use ``order=1`` for
    CT and ``order=0`` for labels; points outside the volume get ``cval``.
    """
    rows = rows or slice(0, len(curve))
    idx = np.arange(len(curve))[rows]
    off_ap, off_lr = plane_offsets(plane_shape, curve.step_mm)
    lin = np.linalg.inv(affine)[:3, :3]
    out = np.empty((len(idx), *plane_shape), dtype=array.dtype if order == 0 else np.float32)
    for start in range(0, len(idx), chunk_rows):
        sel = idx[start : start + chunk_rows]
        base = world_to_voxel(affine, curve.points[sel])  # (r, 3)
        d_ap = curve.ap[sel] @ lin.T  # (r, 3) voxel step per mm along AP
        d_lr = curve.lr[sel] @ lin.T
        coords = (
            base[:, None, None, :]
            + off_ap[None, :, None, None] * d_ap[:, None, None, :]
            + off_lr[None, None, :, None] * d_lr[:, None, None, :]
        )
        out[start : start + len(sel)] = ndimage.map_coordinates(
            array, coords.reshape(-1, 3).T, order=order, mode="grid-constant", cval=cval, prefilter=False
        ).reshape(len(sel), *plane_shape)
    return out


def frame_at(curve: SpineCurve, row: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(point, tangent, ap, lr) at a fractional row: the point interpolated, the frame of the nearest row."""
    row = float(np.clip(row, 0, len(curve) - 1))
    k0 = int(np.floor(row))
    k1 = min(k0 + 1, len(curve) - 1)
    point = curve.points[k0] + (row - k0) * (curve.points[k1] - curve.points[k0])
    k = int(round(row))
    return point, curve.tangent[k], curve.ap[k], curve.lr[k]


def index_to_world(curve: SpineCurve, plane_shape: tuple[int, int], ijk: np.ndarray) -> np.ndarray:
    """World position (mm) of a continuous index (row, ap, lr) of a volume straightened along ``curve``."""
    point, _, ap, lr = frame_at(curve, ijk[0])
    n_ap, n_lr = plane_shape
    return point + (ijk[1] - n_ap // 2) * curve.step_mm * ap + (ijk[2] - n_lr // 2) * curve.step_mm * lr


def turned_frame(tangent: np.ndarray, ap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ap, lr) for a unit ``tangent`` and a direction ``ap`` towards posterior: ``ap`` with its
    tangential part removed, and ``tangent x ap`` (towards the left)."""
    ap = np.asarray(ap, dtype=np.float64) - np.dot(ap, tangent) * tangent
    norm = float(np.linalg.norm(ap))
    if norm < 1e-6:
        raise ValueError("the AP direction runs along the spine")
    ap = ap / norm
    return ap, np.cross(tangent, ap)


def turn_deg(axis: np.ndarray, start: np.ndarray, end: np.ndarray) -> float:
    """Signed angle (degrees) from ``start`` to ``end`` about the unit ``axis`` (right-hand rule):
    about the tangent (towards inferior), a positive turn takes the posterior towards the left."""
    return float(np.degrees(np.arctan2(np.dot(np.cross(start, end), axis), np.dot(start, end))))


def crop_affine(
    curve: SpineCurve,
    row: float,
    shape: tuple[int, int, int],
    ap: np.ndarray | None = None,
    step_mm: float | None = None,
) -> np.ndarray:
    """World affine of a crop centred on the curve at ``row``, in the curve's frame there.

    The crop is a rigid reslice (planes perpendicular to the curve at ``row``): a vertebra in it
    keeps its true shape, which planes bent along a curved spine would not. Axis 0 runs along
    the tangent, axis 1 along AP, axis 2 along LR, ``step_mm`` apart; the centre voxel
    ``(n // 2 for each axis)`` sits on the curve. ``ap`` (world, towards posterior) turns the
    planes' axes about the tangent, e.g. to the vertebra's own anatomy; by default the curve's
    frame (the scanner's posterior). ``step_mm`` overrides the curve's voxel size.
    """
    point, tangent, ap_curve, lr = frame_at(curve, row)
    ap, lr = (ap_curve, lr) if ap is None else turned_frame(tangent, ap)
    aff = np.eye(4)
    aff[:3, :3] = (step_mm or curve.step_mm) * np.stack([tangent, ap, lr], axis=1)
    aff[:3, 3] = point - aff[:3, :3] @ (np.asarray(shape) // 2)
    return aff


# The anatomical AP axis is found on a nearest-neighbour reslice of the vertebra's label alone, in
# a box (height, AP, LR; mm, centred on the curve) wide enough for the whole vertebra with its
# transverse and spinous processes, at this voxel size (or the crops' own, if coarser).
AP_BOX_MM = (100.0, 200.0, 140.0)
AP_STEP_MM = 2.0
# Posterior elements must hold this fraction of the body's volume and lie this far (mm, in the
# plane) from the body's centroid to give a direction; the search stops when the axis turns less
# than AP_CONVERGED_DEG, after at most AP_ITERATIONS reslices.
MIN_POSTERIOR_FRACTION = 0.15
MIN_POSTERIOR_OFFSET_MM = 8.0
# The smallest hole in the vertebra's axial projection taken for its canal (mm²).
MIN_CANAL_MM2 = 40.0
AP_CONVERGED_DEG = 0.5
AP_ITERATIONS = 4
# A turn from the scanner's posterior larger than this is taken for a failed search, not anatomy.
MAX_AP_TURN_DEG = 60.0
# A patient turned less than this about the spine keeps the scanner's posterior (degrees).
MIN_PATIENT_TURN_DEG = 1.0


def posterior_offset_mm(vertebra: np.ndarray, step_mm: float) -> tuple[np.ndarray | None, str, str]:
    """In-plane offset (mm, along axes 1 and 2) from a vertebra's body centroid towards its
    posterior elements, on a binary mask resliced like a crop (height, AP, LR; isotropic voxels).

    The landmark is the spinal canal where the arch closes around it: the largest hole of the
    vertebra's projection along the height axis, of at least ``MIN_CANAL_MM2`` (transverse
    processes, however turned or cut, do not move it). Where the arch is open, the centroid of
    the posterior elements (everything behind the de-pedicled body). Returns (offset, landmark
    ``"canal"`` or ``"posterior elements"``, "") or (None, "", why there is no usable direction):
    no body, too little beyond the body (a label of the body alone, posterior elements cut
    away), or posterior elements centred on the body.
    """
    body = body_mask(vertebra, step_mm)
    if not body.any():
        return None, "", "no vertebral body found"
    centre = np.argwhere(body)[:, 1:].mean(axis=0)
    projection = vertebra.any(axis=0)
    holes, n = ndimage.label(ndimage.binary_fill_holes(projection) & ~projection)
    if n:
        areas = np.bincount(holes.ravel())[1:]
        if areas.max() * step_mm**2 >= MIN_CANAL_MM2:
            canal = np.argwhere(holes == int(np.argmax(areas)) + 1).mean(axis=0)
            offset = (canal - centre) * step_mm
            if float(np.linalg.norm(offset)) >= MIN_POSTERIOR_OFFSET_MM:
                return offset, "canal", ""
    post = vertebra & ~body
    n_body, n_post = int(body.sum()), int(post.sum())
    if n_post < MIN_POSTERIOR_FRACTION * n_body:
        return (
            None,
            "",
            (
                f"no posterior elements in its label ({n_post / n_body:.0%} of the body's volume beyond "
                f"the body, below {MIN_POSTERIOR_FRACTION:.0%})"
            ),
        )
    offset = (np.argwhere(post)[:, 1:].mean(axis=0) - centre) * step_mm
    if float(np.linalg.norm(offset)) < MIN_POSTERIOR_OFFSET_MM:
        return (
            None,
            "",
            (
                f"its posterior elements lie {np.linalg.norm(offset):.1f} mm from the body's centre, "
                f"under {MIN_POSTERIOR_OFFSET_MM:g} mm"
            ),
        )
    return offset, "posterior elements", ""


@dataclass
class CropAP:
    """A crop's AP axis: ``ap`` (world; None keeps the scanner's), its turn from the scanner's
    posterior about the tangent, the landmark it points to (``"scanner"`` for the scanner's
    posterior) and why the anatomy was not used (empty when it was)."""

    ap: np.ndarray | None
    turn_deg: float = 0.0
    landmark: str = "scanner"
    reason: str = ""


def anatomical_ap(
    mask: Volume,
    vid: int,
    curve: SpineCurve,
    row: float,
    step_mm: float = AP_STEP_MM,
    posterior: np.ndarray = POSTERIOR,
) -> CropAP:
    """The AP axis of ``vid``'s crop at ``row`` from its own anatomy, body centroid to posterior
    elements (:func:`posterior_offset_mm`), tangential part removed.

    The vertebra's label is resliced (nearest neighbour) in a box around the curve, de-pedicled
    there and the frame turned to the offset found, until it turns less than ``AP_CONVERGED_DEG``:
    de-pedicling needs the canal behind the body, so a first estimate in a frame turned far from
    the anatomy is refined in the frame it gives. Falls back to the scanner's posterior (``ap``
    None, with the reason) where the label gives no direction or the turn exceeds
    ``MAX_AP_TURN_DEG``. The search starts in the curve's frame; the turn is measured from the
    scanner's ``posterior`` (tangential part removed).
    """
    step = max(float(step_mm), curve.step_mm)
    shape = tuple(max(1, int(round(b / step))) for b in AP_BOX_MM)
    _, tangent, ap, _ = frame_at(curve, row)
    scanner_ap = turned_frame(tangent, posterior)[0]
    turn = turn_deg(tangent, scanner_ap, ap)
    for _ in range(AP_ITERATIONS):
        aff = crop_affine(curve, row, shape, ap, step)
        vertebra = resample_to_grid(mask.array, mask.affine, aff, shape, 0) == vid
        if not vertebra.any():
            return CropAP(None, reason="its label is not near the curve")
        offset, landmark, why = posterior_offset_mm(vertebra, step)
        if offset is None:
            return CropAP(None, reason=why)
        new_ap = aff[:3, 1] / step * offset[0] + aff[:3, 2] / step * offset[1]
        new_ap /= np.linalg.norm(new_ap)
        change = abs(turn_deg(tangent, ap, new_ap))
        ap, turn = new_ap, turn_deg(tangent, scanner_ap, new_ap)
        if abs(turn) > MAX_AP_TURN_DEG:
            return CropAP(None, reason=f"its anatomy turned {turn:.0f} deg from the scanner's posterior")
        if change < AP_CONVERGED_DEG:
            break
    return CropAP(ap, turn, landmark)


def axis_rotation(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rotation matrix by ``deg`` about the vector ``axis`` (right-hand rule)."""
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    a = np.radians(deg)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def patient_posterior(
    mask: Volume,
    curve: SpineCurve,
    centres_mm: dict[int, np.ndarray],
    step_mm: float = AP_STEP_MM,
    posterior: np.ndarray = POSTERIOR,
) -> tuple[np.ndarray, float]:
    """The scanner's ``posterior`` turned about the spine's long axis by the median of the
    vertebrae's anatomical turns (:func:`anatomical_ap`), and that turn (degrees): a reference
    for a whole-curve frame that follows a patient turned in the scanner and still never twists.
    ``posterior`` itself (turn 0) when no vertebra gives a direction."""
    turns = []
    for vid, centre in centres_mm.items():
        found = anatomical_ap(mask, vid, curve, curve.project(np.asarray(centre)), step_mm, posterior)
        if found.ap is not None:
            turns.append(found.turn_deg)
    if not turns:
        return np.asarray(posterior, dtype=np.float64), 0.0
    turn = float(np.median(turns))
    axis = curve.points[-1] - curve.points[0]  # cranial to caudal, like the tangents
    return axis_rotation(axis, turn) @ posterior, turn


def patient_polyline(
    mask: Volume,
    centres_mm: dict[int, np.ndarray],
    step_mm: float,
    extend_mm: float,
    ap_step_mm: float = AP_STEP_MM,
) -> tuple[SpineCurve, float]:
    """The polyline (``degree=1``) through ``centres_mm`` (in spine order), its frame turned about
    the spine with the patient (:func:`patient_posterior`, found at ``ap_step_mm``), and that turn
    in degrees.

    Planes in the scanner's frame across a turned patient would let de-pedicling keep a
    transverse process with the body (or cut part of the body), moving the bodies found on them.
    A turn under ``MIN_PATIENT_TURN_DEG`` keeps the scanner's posterior, so the curve of a
    patient lying straight is exactly the one without this step.
    """
    control = np.array([np.asarray(c, dtype=np.float64) for c in centres_mm.values()])
    curve = fit_spine_curve(control, step_mm, extend_mm, degree=1)
    posterior, turn = patient_posterior(mask, curve, centres_mm, ap_step_mm)
    if abs(turn) < MIN_PATIENT_TURN_DEG:
        return curve, turn
    return fit_spine_curve(control, step_mm, extend_mm, degree=1, posterior=posterior), turn

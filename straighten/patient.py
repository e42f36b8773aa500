"""Straighten one patient: reorient and resample through the affine, fit the spine curve,
de-pedicle, and cut one crop per vertebra centred on its body.

Two passes. The labels straightened along the polyline through the vertebra centroids, its planes
turned about the spine with the patient (:func:`straighten.curve.patient_polyline`, the frame the
completeness step uses too), are de-pedicled to find each vertebral body; the final curve, a
smoothing spline, runs through the body centroids (the posterior elements no longer pull it
about, so its tangent follows each body's axis). Each crop is a rigid reslice in the final curve's
frame at its body (planes perpendicular to the curve there): the target keeps its true shape and
the crop's affine is its true scanner position.
Label crops go through each label's signed distance (``straighten/label_resample.py``), so thick
slices leave ramps, not staircases, where an endplate crosses them.

Each crop's anterior-posterior axis follows the vertebra's own anatomy (``crop_ap="anatomy"``):
the direction from its body's centroid to its spinal canal (the largest hole in the label's
projection along the spine; the centroid of the posterior elements where the arch is open), with
the tangential part removed (:func:`anatomical_ap`), so a patient turned in the scanner or a rotated
scoliotic vertebra gets crops whose axis 1 runs from its body to its canal and whose axis 2 is its
own left-right. A label with no usable posterior elements (labels of the bodies only, posterior
elements cut away) keeps the scanner's posterior (the curve's frame), and the curve json says why;
``crop_ap="scanner"`` is the previous frame everywhere. The curve json records, per crop, the turn
from the scanner's posterior to the crop's AP axis about the tangent (``ap_turn_deg``).

Only complete vertebrae get a crop (``"complete"`` in the centroid json): a vertebra whose body is
cut by the scan's edge keeps its centroid, which steers the curve, and stays a neighbour in the
crops of others, but the curve json lists it under ``not_measurable`` with its reason.

Everything is read and checked before anything is written, so bad input leaves no partial
crops; each file is written atomically, the curve json last (its presence marks a finished
patient). The curve json records the options that shape the crops (``"options"``); a patient
finished with other options is not taken for done, nor redone without ``overwrite``. It also
records the inputs the crops were made from (``"inputs"``: size, modification time and SHA-256 of
the mask, the CT and the centroid json); a patient whose inputs have changed since (a centroid
json written again with other thresholds, a corrected mask) is straightened again, and crops of
vertebrae no longer measurable are removed. A copied or moved dataset with the same contents is
still finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from data import label_schemes
from data.layout import RawCase, curve_path, raw_case, straightened_paths
from data.nifti_io import Volume, load_case, resample_to_grid, save_nifti, voxel_to_world
from straighten.centroids import (
    curve_labels,
    label_volumes_mm3,
    read_centroids,
    read_completeness,
    vertebra_completeness,
    vertebra_labels,
)
from straighten.curve import (
    AP_STEP_MM,
    MIN_PATIENT_TURN_DEG,
    CropAP,
    SpineCurve,
    anatomical_ap,
    crop_affine,
    fit_spine_curve,
    index_to_world,
    patient_polyline,
    straighten,
)
from straighten.depedicle import body_mask, depedicle
from straighten.label_resample import LabelFields
from util.atomic import write_json
from util.checkpoint import file_sha256
from util.errors import InputError, failure_line, input_error
from util.log_prefix import prefixed_logs

log = logging.getLogger(__name__)

AIR_HU = -1024.0
# Straight extension of the first-pass curve beyond the end centroids: enough to hold the whole
# body of an end vertebra (the crops themselves are rigid and need no curve).
CURVE_EXTENSION_MM = 40.0
# A centroid must lie within this distance (mm) of its own label.
CENTROID_TOLERANCE_MM = 10.0
CROP_AP_MODES = ("anatomy", "scanner")


@dataclass
class StraightenOptions:
    spacing_mm: float = 1.0
    crop_mm: tuple[float, float, float] = (256.0, 256.0, 64.0)
    window: tuple[float, float] = (-300.0, 800.0)
    label_scheme: str = "verse"
    labels_only: bool = False
    smoothing_mm: float = 1.0
    overwrite: bool = False
    # how label crops are resampled (straighten/label_resample.py)
    label_resampling: str = "distance"
    # the crops' AP axis: the vertebra's own (body to posterior elements) or the scanner's posterior
    crop_ap: str = "anatomy"

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(max(1, int(round(c / self.spacing_mm))) for c in self.crop_mm)


@dataclass
class PatientResult:
    pid: str
    vertebrae: list[int] = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False


def window_to_uint8(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """HU window [lo, hi] mapped linearly to 0..255, clipped and rounded."""
    return np.rint(np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def ordered_vertebrae(centroids: dict[int, np.ndarray], mask: Volume, json_path: Path) -> list[int]:
    """The centroid labels in spine order, after checking they fit the mask.

    Errors: fewer than two vertebrae; a centroid for a label the mask lacks; a vertebra of the
    mask between the first and last centroids without one (end vertebrae without centroids are
    partial ones the centroid step left out); a centroid far from its label.
    """
    vids = [v for v in centroids if label_schemes.is_vertebra(v)]
    present = set(vertebra_labels(mask.array))
    absent = sorted(set(vids) - present)
    if absent:
        names = ", ".join(f"{label_schemes.vertebra_name(v)} ({v})" for v in absent)
        raise input_error(json_path, f"centroids for labels the mask {mask.path.name} does not have: {names}")
    if len(vids) < 2:
        raise input_error(
            mask.path,
            f"straightening needs at least two vertebrae with centroids, found {len(vids)} "
            f"({json_path.name})",
        )
    order = label_schemes.sort_spine_order(vids)
    lo, hi = label_schemes.spine_rank(order[0]), label_schemes.spine_rank(order[-1])
    gap = sorted(v for v in present - set(vids) if lo < label_schemes.spine_rank(v) < hi)
    if gap:
        names = ", ".join(f"{label_schemes.vertebra_name(v)} ({v})" for v in gap)
        raise input_error(json_path, f"centroids missing for labels {names} of {mask.path.name}")
    boxes = ndimage.find_objects(mask.array)
    tol = CENTROID_TOLERANCE_MM / mask.spacing
    for v in order:
        box = boxes[v - 1]
        c = centroids[v]
        if any(c[k] < box[k].start - tol[k] or c[k] > box[k].stop - 1 + tol[k] for k in range(3)):
            raise input_error(
                json_path,
                f"the centroid of label {v} lies outside that label in {mask.path.name} "
                "(is the json from another scan, or in another axis order?)",
            )
    return order


def crop_is_readable(path: Path, shape: tuple[int, ...] | None = None) -> bool:
    """Cheap check that a crop is whole: its header reads and (gzip) its stored size is complete.

    The gzip trailer holds the uncompressed length; a truncated file ends elsewhere in the
    stream, so its last four bytes do not match the length the header implies. Nothing is
    decompressed beyond the header.
    """
    try:
        img = nib.load(str(path))
        header = img.header
        if shape is not None and tuple(img.shape[:3]) != tuple(shape):
            return False
        offset = int(header["vox_offset"]) or 352
        expected = offset + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
        size = path.stat().st_size
        with open(path, "rb") as fh:
            magic = fh.read(2)
            if magic != b"\x1f\x8b":
                return size >= expected
            fh.seek(-4, 2)
            return int.from_bytes(fh.read(4), "little") == expected % (1 << 32)
    except Exception:  # any failure to read means the crop must be redone
        return False


# The options that shape the crops, recorded in the curve json ("options") by these names, and
# the flags that set them.
OPTION_FLAGS = {
    "spacing_mm": "--spacing_mm",
    "crop_mm": "--crop_mm",
    "window_hu": "--window",
    "label_scheme": "--label_scheme",
    "label_resampling": "--label_resampling",
    "crop_ap": "--crop_ap",
    "smoothing_mm": "--smoothing_mm",
}


def option_record(opt: StraightenOptions) -> dict:
    """The options that shape a patient's crops, as its curve json records them."""
    return {
        "spacing_mm": float(opt.spacing_mm),
        "crop_mm": [float(c) for c in opt.crop_mm],
        "window_hu": [float(w) for w in opt.window],
        "label_scheme": str(opt.label_scheme),
        "label_resampling": str(opt.label_resampling),
        "crop_ap": str(opt.crop_ap),
        "smoothing_mm": float(opt.smoothing_mm),
    }


def recorded_options(record: dict, opt: StraightenOptions) -> dict:
    """The options a curve json was made with; those it cannot tell are left out.

    A curve json written before the options were recorded still says its voxel size, crop shape
    (the crop size in mm at that voxel size), window and AP mode (absent: made before
    ``--crop_ap``, in the scanner's frame); its label scheme, label resampling and smoothing are
    unknown.
    """
    if isinstance(record.get("options"), dict):
        return record["options"]
    known = {}
    if "spacing_mm" in record:
        known["spacing_mm"] = record["spacing_mm"]
    if "crop_shape" in record:
        shape = [int(n) for n in record["crop_shape"]]
        same = shape == list(opt.crop_shape) and known.get("spacing_mm") == opt.spacing_mm
        spacing = float(known.get("spacing_mm", opt.spacing_mm))
        known["crop_mm"] = [float(c) for c in opt.crop_mm] if same else [n * spacing for n in shape]
    if "window_hu" in record:
        known["window_hu"] = record["window_hu"]
    known["crop_ap"] = record.get("crop_ap", "scanner")
    return known


def _option_text(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_option_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_differences(root: Path, pid: str, opt: StraightenOptions) -> tuple[list[str], list[str]]:
    """How the options of ``pid``'s curve json differ from ``opt``: ("--flag then (this run now)"
    for each option that differs, the flags the json does not record). Both empty when there is
    no readable curve json."""
    try:
        record = json.loads(curve_path(root, pid).read_text())
        then = recorded_options(record, opt) if isinstance(record, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return [], []
    now = option_record(opt)
    differ, unknown = [], []
    for key, flag in OPTION_FLAGS.items():
        if key not in then:
            unknown.append(flag)
            continue
        a, b = then[key], now[key]
        same = a == b
        with contextlib.suppress(TypeError, ValueError):
            same = np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=0, atol=1e-9)
        if not same:
            differ.append(f"{flag} {_option_text(a)}, this run {_option_text(b)}")
    return differ, unknown


def other_options(root: Path, pid: str, opt: StraightenOptions) -> str | None:
    """Why ``pid``'s finished outputs cannot be kept for a run with ``opt`` (made with other
    options), or None (they match, are unknown, or there are none)."""
    differ, _ = option_differences(root, pid, opt)
    if not differ:
        return None
    return f"made with other options ({'; '.join(differ)}); pass --overwrite to redo it with these"


def _input_files(case: RawCase, labels_only: bool) -> dict[str, Path | None]:
    return {"mask": case.mask, "ct": None if labels_only else case.ct, "centroids": case.centroids}


def input_record(case: RawCase, labels_only: bool) -> dict[str, dict]:
    """Size, modification time and SHA-256 of each input file of ``case`` the crops are made from."""
    record = {}
    for name, path in _input_files(case, labels_only).items():
        if path is not None and path.is_file():
            st = path.stat()
            record[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return record


def changed_inputs(root: Path, pid: str, record: dict, labels_only: bool) -> list[str]:
    """The input files of ``pid`` whose contents differ from those its curve json records.

    A file of the same size and modification time is taken as unchanged; otherwise its SHA-256
    decides (a copied dataset keeps its contents, not its times). Empty for a curve json that
    records no inputs (written before they were recorded), and for inputs that are gone now (the
    crops cannot be made again without them; straightening says so when asked to).
    """
    then = record.get("inputs")
    if not isinstance(then, dict):
        return []
    try:
        case = raw_case(root, pid)
    except InputError:
        return []
    changed = []
    for name, path in _input_files(case, labels_only).items():
        old = then.get(name)
        if not isinstance(old, dict) or path is None or not path.is_file():
            continue
        st = path.stat()
        if st.st_size == old.get("size") and st.st_mtime_ns == old.get("mtime_ns"):
            continue
        if st.st_size != old.get("size"):
            changed.append(path.name)
            continue
        try:
            digest = file_sha256(path)
        except InputError:  # unreadable now: cannot tell; straightening it again would name the file
            continue
        if digest != old.get("sha256"):
            changed.append(path.name)
    return changed


def is_done(root: Path, pid: str, labels_only: bool, opt: StraightenOptions | None = None) -> bool:
    """True if the patient's curve json and every crop it lists exist and are readable, and its
    inputs have not changed since (:func:`changed_inputs`); with ``opt``, also that it was not made
    with other options (:func:`other_options`)."""
    path = curve_path(root, pid)
    if not path.is_file():
        return False
    if opt is not None and other_options(root, pid, opt):
        return False
    try:
        record = json.loads(path.read_text())
        crops = record["crops"]
        shape = tuple(int(n) for n in record["crop_shape"]) if "crop_shape" in record else None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for vid in crops:
        ct, label = straightened_paths(root, pid, int(vid))
        if not crop_is_readable(label, shape) or (not labels_only and not crop_is_readable(ct, shape)):
            return False
    changed = changed_inputs(root, pid, record, labels_only)
    if changed:
        log.warning("%s: %s changed since it was straightened: straightened again", pid, ", ".join(changed))
        return False
    return True


def centred_crop(
    mask: Volume,
    vid: int,
    affine: np.ndarray,
    shape: tuple[int, int, int],
    spacing_mm: float,
    fields: LabelFields | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(affine, labels, body) of a crop whose centre row holds the centroid of ``vid``'s body.

    The body found in the first pass sits within a few rows of the centre; the crop is moved
    along its own axis by what remains (a rigid move, so one step is enough) and resampled.
    Labels are resampled by ``fields`` (nearest neighbour without).
    """
    fields = fields or LabelFields(mask.array, mask.affine, "nearest")

    def sample(aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = fields.resample(aff, shape)
        body = body_mask(labels == vid, spacing_mm)
        if not body.any():
            raise input_error(mask.path, f"label {vid}: no vertebral body found in its crop")
        return labels, body

    labels, body = sample(affine)
    shift = float(np.nonzero(body)[0].mean()) - shape[0] // 2
    if abs(shift) >= 0.5:
        affine = affine.copy()
        affine[:3, 3] += shift * affine[:3, 0]
        labels, body = sample(affine)
    return affine, labels, body


def keep_bodies(
    labels: np.ndarray, affine: np.ndarray, affines: dict, bodies: dict, spacing_mm: float
) -> np.ndarray:
    """De-pedicle a crop: each vertebra keeps the voxels that lie in its own body.

    A vertebra's body is found in its own crop, where it is aligned with the axes; in another
    crop it may be tilted by the curvature between the two, so its voxels there are mapped
    (one rigid transform) into its own crop and kept where its body is. Vertebrae without a
    crop of their own (partial ones at the field-of-view edge) are de-pedicled in place.
    """
    out = labels.copy()
    for vid in np.flatnonzero(np.bincount(labels.ravel())):
        if not label_schemes.is_vertebra(vid):
            continue
        sel = labels == vid
        if int(vid) not in bodies:
            out[sel & ~body_mask(sel, spacing_mm)] = 0
            continue
        idx = np.argwhere(sel)
        to_own = np.linalg.inv(affines[int(vid)]) @ affine
        own = idx @ to_own[:3, :3].T + to_own[:3, 3]
        inside = ndimage.map_coordinates(
            bodies[int(vid)].astype(np.uint8), own.T, order=0, mode="constant", cval=0
        )
        drop = idx[inside == 0]
        out[tuple(drop.T)] = 0
    return out


def curve_record(
    pid: str,
    curve: SpineCurve,
    opt: StraightenOptions,
    crops: dict,
    centroids_mm: dict,
    sources: dict,
    not_measurable: dict | None = None,
) -> dict:
    return {
        "pid": pid,
        "sources": sources,
        "spacing_mm": opt.spacing_mm,
        "crop_shape": list(opt.crop_shape),
        "window_hu": list(opt.window),
        "frame": "world RAS mm; tangent to inferior, ap to posterior, lr to left",
        "crop_ap": opt.crop_ap,
        "options": option_record(opt),
        "origin_row": curve.origin_row,
        "points_mm": np.round(curve.points, 3).tolist(),
        "tangent": np.round(curve.tangent, 5).tolist(),
        "ap": np.round(curve.ap, 5).tolist(),
        "lr": np.round(curve.lr, 5).tolist(),
        "body_centroids_mm": {str(v): np.round(c, 3).tolist() for v, c in centroids_mm.items()},
        "crops": {str(v): c for v, c in crops.items()},
        "not_measurable": {str(v): reason for v, reason in (not_measurable or {}).items()},
    }


def straighten_patient(
    root: str | Path, pid: str, opt: StraightenOptions, skip_done: bool = True
) -> PatientResult:
    """Straighten one patient and write its crops; an :class:`InputError` leaves nothing behind.
    ``skip_done=False`` is for a caller that has checked already (:func:`run_patient`)."""
    start = time.perf_counter()
    root = Path(root)
    if not opt.overwrite and skip_done:
        differ = other_options(root, pid, opt)
        if differ:
            raise input_error(curve_path(root, pid), differ)
        if is_done(root, pid, opt.labels_only):
            return PatientResult(pid, skipped=True)
    case = raw_case(root, pid)
    inputs = input_record(case, opt.labels_only)  # before reading: a file changed meanwhile is redone
    if not opt.labels_only and case.ct is None:
        raise input_error(case.folder, f"no CT {pid}.nii.gz (pass --labels_only for mask-only data)")
    ct, mask = load_case(None if opt.labels_only else case.ct, case.mask, opt.label_scheme)
    centroids = read_centroids(case.centroids)
    order = ordered_vertebrae(centroids, mask, case.centroids)
    states = read_completeness(case.centroids)
    if states is None:  # the reference's format: find the cut vertebrae here
        try:
            states = vertebra_completeness(mask.array, mask.affine)
        except ValueError as exc:
            raise input_error(case.mask, f"cannot tell which vertebrae are cut: {exc}") from exc
        log.info("%s: no completeness in %s; found from the mask", pid, case.centroids.name)
    not_measurable = {
        v: states[v].reason or "not measurable" for v in order if v in states and not states[v].complete
    }
    measured = [v for v in order if v not in not_measurable]
    # fragments at the scan's edge would bend the curve; cut vertebrae of real size steer it
    world = {v: voxel_to_world(mask.affine, centroids[v]) for v in order}
    steering = curve_labels(label_volumes_mm3(mask.array, float(np.prod(mask.spacing)), order), world)
    steering = [v for v in order if v in steering or v in measured]
    if len(steering) < 2:
        raise input_error(mask.path, f"straightening needs two vertebrae of real size, found {len(steering)}")
    if not measured:
        log.warning("%s: no complete vertebra (%s)", pid, "; ".join(not_measurable.values()))

    n_rows, n_ap, n_lr = opt.crop_shape
    plane = (n_ap, n_lr)
    try:
        # the polyline: a partial end vertebra's centroid (mostly posterior elements) would make a
        # spline overshoot; this pass only has to find the bodies, on planes turned with the patient
        # (in the scanner's frame de-pedicling a turned patient would move them)
        first, turn = patient_polyline(
            mask,
            {v: world[v] for v in steering},
            opt.spacing_mm,
            CURVE_EXTENSION_MM,
            max(AP_STEP_MM, opt.spacing_mm),
        )
        if abs(turn) >= MIN_PATIENT_TURN_DEG:
            log.info(
                "%s: the patient is turned %.1f deg about the spine; bodies found in its frame", pid, turn
            )
        along = depedicle(straighten(mask.array, mask.affine, first, plane, order=0), opt.spacing_mm)
        bodies = {}
        for v in steering:
            idx = np.argwhere(along == v)
            if idx.size == 0:
                if v in not_measurable:  # a cut vertebra may have lost its body: it only steers
                    continue
                raise input_error(
                    case.mask, f"label {v} has no body left after straightening and de-pedicling"
                )
            bodies[v] = index_to_world(first, plane, idx.mean(axis=0))
        through = np.array([bodies[v] for v in steering if v in bodies])
        try:
            curve = fit_spine_curve(through, opt.spacing_mm, CURVE_EXTENSION_MM, opt.smoothing_mm)
        except ValueError:
            log.warning("%s: the spline through the bodies overshoots at an end; using the polyline", pid)
            curve = fit_spine_curve(through, opt.spacing_mm, CURVE_EXTENSION_MM, degree=1)
    except ValueError as exc:
        raise input_error(case.centroids, str(exc)) from exc
    affines, raw_labels, own_body, crops, fallback = {}, {}, {}, {}, {}
    fields = LabelFields(mask.array, mask.affine, opt.label_resampling)
    for v in measured:
        row = curve.project(bodies[v])
        frame = anatomical_ap(mask, v, curve, row) if opt.crop_ap == "anatomy" else CropAP(None)
        affines[v], raw_labels[v], own_body[v] = centred_crop(
            mask, v, crop_affine(curve, row, opt.crop_shape, frame.ap), opt.crop_shape, opt.spacing_mm, fields
        )
        centre = affines[v] @ np.r_[np.asarray(opt.crop_shape) // 2, 1.0]
        crops[v] = {
            "curve_row": round(row, 2),
            "centre_mm": np.round(centre[:3], 3).tolist(),
            "ap_from": frame.landmark,
            "ap_turn_deg": round(frame.turn_deg, 2),
        }
        if frame.reason:
            crops[v]["ap_reason"] = frame.reason
            fallback[v] = frame.reason
    if fallback:
        log.warning(
            "%s: crop AP axis from the scanner's posterior for %s",
            pid,
            "; ".join(f"{label_schemes.vertebra_name(v)}: {why}" for v, why in fallback.items()),
        )

    outputs = []
    for v in measured:
        labels = keep_bodies(raw_labels[v], affines[v], affines, own_body, opt.spacing_mm)
        image = None
        if ct is not None:
            hu = resample_to_grid(ct.array, ct.affine, affines[v], opt.crop_shape, 1, AIR_HU)
            image = window_to_uint8(hu, *opt.window)
        outputs.append((v, labels, image))

    for v, labels, image in outputs:
        ct_path, label_path = straightened_paths(root, pid, v)
        note = f"HealthiVert crop {pid} {label_schemes.vertebra_name(v)}"
        save_nifti(label_path, labels, affines[v], dtype=np.uint8, descrip=note)
        if image is not None:
            save_nifti(ct_path, image, affines[v], descrip=note)
    sources = {
        "mask": str(case.mask),
        "ct": None if ct is None else str(case.ct),
        "centroids": str(case.centroids),
    }
    record = curve_record(pid, curve, opt, crops, bodies, sources, not_measurable)
    record["inputs"] = inputs
    write_json(curve_path(root, pid), record)
    return PatientResult(pid, measured, time.perf_counter() - start)


def _patient_files(root: Path, pid: str) -> list[Path]:
    """Every output file of ``pid``: crops, the curve, and temporary files a killed run left."""
    crop = re.compile(rf"^\.?{re.escape(pid)}_\d+\.nii\.gz(\..*\.tmp.*)?$")
    curve = re.compile(rf"^\.?{re.escape(pid)}\.json(\..*\.tmp.*)?$")
    files = []
    for folder, pattern in (
        (straightened_paths(root, pid, 0)[0].parent, crop),
        (straightened_paths(root, pid, 0)[1].parent, crop),
        (curve_path(root, pid).parent, curve),
    ):
        with contextlib.suppress(OSError):
            files += [p for p in folder.iterdir() if pattern.match(p.name) and not p.is_dir()]
    return files


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and ".tmp" in path.name


def _unlink(paths: list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_patient_outputs(root: str | Path, pid: str) -> None:
    """Remove every crop, the curve and any temporary file of ``pid`` (after a failure)."""
    _unlink(_patient_files(Path(root), pid))


def remove_stale_crops(root: str | Path, pid: str, vertebrae: list[int], labels_only: bool) -> None:
    """Remove the crops of ``pid`` for vertebrae not in ``vertebrae`` (no longer in the mask).

    A labels-only run writes no CT crops, so the CT crops of an earlier run, which no longer
    match the new label crops, go too.
    """
    root = Path(root)
    keep = set()
    for v in vertebrae:
        ct, label = straightened_paths(root, pid, v)
        keep |= {label} if labels_only else {ct, label}
    curve = curve_path(root, pid)
    _unlink([p for p in _patient_files(root, pid) if p not in keep and p != curve and not _is_temp(p)])


# Modules whose log lines (islands left out of a centroid, a vertebra without a body) do not say
# which patient they are about.
_UNNAMED_LOGGERS = ("straighten.centroids", "straighten.depedicle", "straighten.label_resample")


def run_patient(root: str, pid: str, opt: StraightenOptions) -> tuple[PatientResult | None, str | None]:
    """:func:`_run_patient` with the log lines of the modules it calls naming ``pid``."""
    with prefixed_logs(_UNNAMED_LOGGERS, pid):
        return _run_patient(root, pid, opt)


def _run_patient(root: str, pid: str, opt: StraightenOptions) -> tuple[PatientResult | None, str | None]:
    """Worker entry point: the result, or one line naming the file and the problem.

    Any exception ends this patient only (input errors, full disks, unwritable folders, memory,
    bugs), and the patient's outputs are removed so that no later run takes them for finished.
    With ``overwrite`` the curve json (the mark of a finished patient) goes first, so an
    interrupted rewrite is redone too; crops of vertebrae no longer in the mask are removed.
    A patient finished with other options (:func:`other_options`) is left as it is, with a line
    saying so. Temporary files a killed run left are removed first. KeyboardInterrupt passes through, after
    removing what this patient had written.
    """
    root_path = Path(root)
    _unlink([p for p in _patient_files(root_path, pid) if _is_temp(p)])
    if not opt.overwrite:
        differ = other_options(root_path, pid, opt)
        if differ:  # kept: the user chooses whether to redo them
            return None, f"{curve_path(root_path, pid)}: {differ}"
        if is_done(root_path, pid, opt.labels_only):
            return PatientResult(pid, skipped=True), None
    try:
        if opt.overwrite:
            _unlink([curve_path(root_path, pid)])
        result = straighten_patient(root, pid, opt, skip_done=False)
        if not result.skipped:
            remove_stale_crops(root_path, pid, result.vertebrae, opt.labels_only)
        return result, None
    except Exception as exc:  # one patient's failure of any kind must not stop the run
        log.debug("%s failed", pid, exc_info=True)
        remove_patient_outputs(root_path, pid)
        return None, failure_line(exc, root_path / "raw" / pid)
    except BaseException:  # Ctrl-C: the patient being written leaves nothing half done behind
        remove_patient_outputs(root_path, pid)
        raise

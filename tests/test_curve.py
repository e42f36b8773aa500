"""Spine curve, frames and straightened resampling: known answers."""

import json

import numpy as np
import pytest

from data.nifti_io import Volume, load_ct, load_mask, reorient, resample_to_grid, voxel_to_world
from straighten.curve import crop_affine, fit_spine_curve, frames, index_to_world, straighten


def test_straight_line_gives_uniform_samples_and_patient_frame():
    pts = np.array([[0, 0, 100.0], [0, 0, 60.0], [0, 0, 20.0], [0, 0, -20.0]])  # cranial to caudal
    curve = fit_spine_curve(pts, step_mm=2.0, extend_mm=10.0)
    assert curve.origin_row == 5 and len(curve) == 5 + 61 + 5
    np.testing.assert_allclose(np.diff(curve.points, axis=0), [[0, 0, -2.0]] * (len(curve) - 1), atol=1e-9)
    np.testing.assert_allclose(curve.points[curve.origin_row], pts[0], atol=1e-9)
    np.testing.assert_allclose(curve.tangent, [[0, 0, -1.0]] * len(curve), atol=1e-9)
    np.testing.assert_allclose(curve.ap, [[0, -1.0, 0]] * len(curve), atol=1e-9)  # posterior
    np.testing.assert_allclose(curve.lr, [[-1.0, 0, 0]] * len(curve), atol=1e-9)  # left
    assert curve.project(np.array([3.0, -4.0, 41.0])) == pytest.approx(5 + 29.5)


def test_arc_length_and_frames_on_a_circular_arc():
    radius, theta = 150.0, np.deg2rad(60)
    t = np.linspace(0, theta, 9)
    pts = np.stack([np.zeros_like(t), radius * (1 - np.cos(t)), -radius * np.sin(t)], axis=1)
    curve = fit_spine_curve(pts, step_mm=1.0, smoothing_mm=0.0)
    steps = np.linalg.norm(np.diff(curve.points, axis=0), axis=1)
    assert steps == pytest.approx(1.0, abs=2e-3)
    assert len(curve) - 1 == pytest.approx(radius * theta, abs=1.0)
    # orthonormal, right-handed, and no twist: consecutive frames barely turn about the tangent
    for a, b in ((curve.tangent, curve.ap), (curve.tangent, curve.lr), (curve.ap, curve.lr)):
        assert np.abs((a * b).sum(axis=1)).max() < 1e-9
    np.testing.assert_allclose(np.cross(curve.tangent, curve.ap), curve.lr, atol=1e-9)
    assert (curve.lr @ [-1.0, 0, 0]).min() > 0.999  # the arc lies in a sagittal plane: LR never moves


def test_curve_along_the_ap_axis_is_refused():
    with pytest.raises(ValueError, match="anterior-posterior"):
        frames(np.array([[0, 1.0, 0]]))
    with pytest.raises(ValueError):
        fit_spine_curve(np.array([[0, 0, 0.0]]))


def straight_volume():
    """A RAS volume with a straight 'spine' of labelled slabs along z, and random CT."""
    rng = np.random.default_rng(0)
    ct = rng.normal(0, 300, (30, 26, 80)).astype(np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    for i, vid in enumerate(range(18, 24)):
        labels[10:20, 8:18, 5 + 12 * i : 14 + 12 * i] = vid
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-20.0, 7.5, -60.0]
    return ct, labels, affine


def test_a_straightened_straight_spine_equals_its_input():
    ct, labels, affine = straight_volume()
    # control points on voxel centres of one column of the array (i=15, j=13)
    control = voxel_to_world(affine, np.array([[15, 13, k] for k in (70, 50, 30, 10)]))
    curve = fit_spine_curve(control, step_mm=1.5, extend_mm=6.0)
    plane = (20, 24)
    out_labels = straighten(labels, affine, curve, plane, order=0)
    out_ct = straighten(ct, affine, curve, plane, order=1)
    canonical_l = reorient(Volume(labels, affine)).array
    canonical_c = reorient(Volume(ct, affine)).array
    # canonical I-P-L: row r <-> z index 79 - r, ap i <-> y index 25 - i, lr j <-> x index 29 - j
    k0 = 79 - 70 - curve.origin_row
    i0, j0 = (25 - 13) - plane[0] // 2, (29 - 15) - plane[1] // 2
    expected = (slice(k0, k0 + len(curve)), slice(i0, i0 + plane[0]), slice(j0, j0 + plane[1]))
    np.testing.assert_array_equal(out_labels, canonical_l[expected])
    np.testing.assert_allclose(out_ct, canonical_c[expected], atol=1e-3)


def test_a_rigid_crop_on_a_straight_spine_is_a_block_of_the_input():
    ct, labels, affine = straight_volume()
    control = voxel_to_world(affine, np.array([[15, 13, k] for k in (70, 50, 30, 10)]))
    curve = fit_spine_curve(control, step_mm=1.5)
    shape = (16, 10, 8)
    aff = crop_affine(curve, 20.0, shape)
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)), [1.5, 1.5, 1.5])
    crop = resample_to_grid(labels, affine, aff, shape, order=0)
    canonical = reorient(Volume(labels, affine)).array
    r0 = (79 - 70) + 20 - shape[0] // 2
    np.testing.assert_array_equal(crop, canonical[r0 : r0 + 16, 12 - 5 : 12 + 5, 14 - 4 : 14 + 4])
    # the centre voxel of the crop sits on the curve
    centre = aff @ np.r_[np.array(shape) // 2, 1]
    np.testing.assert_allclose(centre[:3], index_to_world(curve, (10, 8), np.array([20.0, 5, 4])), atol=1e-9)


def test_the_straight_phantom_comes_out_unchanged(tmp_path):
    from data.phantom import generate

    generate(tmp_path, patients=1, seed=2, spacing_mm=2.0, levels="T12-L3", straight=True, progress=False)
    mask = load_mask(tmp_path / "raw/phantom000/phantom000_msk.nii.gz")
    ct = load_ct(tmp_path / "raw/phantom000/phantom000.nii.gz")
    geo = json.loads((tmp_path / "truth/phantom000/phantom000_geometry.json").read_text())
    centres = np.array([v["centre_mm"] for v in geo["vertebrae"] if v["full"]])
    # a straight spine: the body centres are collinear along z; put them on voxel centres
    ijk = np.rint(np.linalg.solve(mask.affine[:3, :3], (centres - mask.affine[:3, 3]).T).T)
    assert np.ptp(ijk[:, 0]) == 0 and np.ptp(ijk[:, 1]) == 0
    curve = fit_spine_curve(voxel_to_world(mask.affine, ijk), step_mm=2.0)
    plane = (60, 30)
    out_l = straighten(mask.array, mask.affine, curve, plane, order=0)
    out_c = straighten(ct.array, ct.affine, curve, plane, order=1)
    can_l, can_c = reorient(mask).array, reorient(ct).array
    i, j, k = (int(x) for x in ijk[0])
    # canonical I-P-L indices of the first control point
    k_c, i_c, j_c = mask.shape[2] - 1 - k, mask.shape[1] - 1 - j, mask.shape[0] - 1 - i
    box = (slice(k_c, k_c + len(curve)), slice(i_c - 30, i_c + 30), slice(j_c - 15, j_c + 15))
    np.testing.assert_array_equal(out_l, can_l[box])
    np.testing.assert_allclose(out_c, can_c[box], atol=1e-3)


def test_polyline_samples_lie_on_its_segments():
    pts = np.array([[0, 0, 100.0], [0, 10, 70.0], [0, 12, 40.0], [0, 0, 10.0]])
    curve = fit_spine_curve(pts, step_mm=0.5, degree=1)

    def distance_to_polyline(x):
        d = []
        for a, b in zip(pts[:-1], pts[1:], strict=True):
            t = np.clip((x - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
            d.append(np.linalg.norm(x - (a + t * (b - a))))
        return min(d)

    assert max(distance_to_polyline(x) for x in curve.points) < 1e-9
    steps = np.linalg.norm(np.diff(curve.points, axis=0), axis=1)
    assert steps.max() <= 0.5 + 1e-9 and steps.min() > 0.45  # corners cut by under 0.05 mm
    first = (pts[1] - pts[0]) / np.linalg.norm(pts[1] - pts[0])
    np.testing.assert_allclose(curve.tangent[:10], np.repeat(first[None], 10, axis=0), atol=1e-9)

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from data.nifti_io import (
    check_same_grid,
    load_case,
    load_ct,
    load_mask,
    reorient,
    resample,
    resample_to_grid,
    sample_world,
    save_nifti,
    voxel_to_world,
)
from tests.conftest import write_nifti
from util.atomic import atomic_dir, atomic_path
from util.errors import InputError


def oblique_affine():
    angle = np.deg2rad(10)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    aff[:3, 3] = [-40.5, 12.25, 97.0]
    return aff


def test_round_trip_keeps_affine_and_values(tmp_path):
    aff = oblique_affine()
    data = np.random.default_rng(0).integers(-1000, 2000, (7, 8, 9)).astype(np.int16)
    path = save_nifti(tmp_path / "ct.nii.gz", data, aff)
    ct = load_ct(path)
    np.testing.assert_allclose(ct.affine, aff, atol=1e-5)
    np.testing.assert_array_equal(ct.array, data.astype(np.float32))
    img = nib.load(str(path))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_reorient_to_canonical_keeps_world_positions():
    # RAS array: axis 0 = x (to Right), axis 2 = z (to Superior)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [5, 6, 7]
    arr = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    vol = reorient(__import__("data.nifti_io", fromlist=["Volume"]).Volume(arr, aff))
    assert vol.axcodes == ("I", "P", "L")
    assert vol.shape == (6, 5, 4)
    # the same voxel value sits at the same world point
    i, j, k = 1, 2, 3
    world = voxel_to_world(aff, [i, j, k])
    ijk_new = np.rint(np.linalg.solve(vol.affine[:3, :3], world - vol.affine[:3, 3])).astype(int)
    assert vol.array[tuple(ijk_new)] == arr[i, j, k]
    np.testing.assert_allclose(vol.spacing, [3, 2, 1])


def test_resample_linear_and_nearest():
    from data.nifti_io import Volume

    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ramp = np.broadcast_to(np.arange(10, dtype=np.float32)[:, None, None], (10, 4, 4)).copy()
    fine = resample(Volume(ramp, aff), 1.0, order=1)
    assert fine.shape == (20, 8, 8)
    np.testing.assert_allclose(fine.spacing, [1, 1, 1])
    # index 3 of the fine grid sits 1.5 coarse voxels from the start: linear gives 1.5
    assert fine.array[3, 0, 0] == pytest.approx(1.5)
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[4:6] = 7
    nearest = resample(Volume(labels, aff), 1.0, order=0)
    assert set(np.unique(nearest.array)) == {0, 7}
    # world position is kept: the first voxel centre does not move
    np.testing.assert_allclose(fine.affine[:3, 3], aff[:3, 3])


def test_resample_to_grid_edges_constant_or_nearest():
    from data.nifti_io import Volume

    # 101 slices at 1 mm worked at 1.5 mm: 67 slices, the last centre 1 mm short of the input's
    original = Volume(np.zeros((101, 4, 4), np.float32), np.eye(4))
    work = resample(original, 1.5, order=1)
    assert work.shape[0] == 67
    values = np.full(work.shape, 100.0, np.float32)
    back = resample_to_grid(values, work.affine, original.affine, original.shape, 1, cval=-1000.0)
    assert back[-1].max() < 0  # the default: blended with cval past the working grid
    back = resample_to_grid(values, work.affine, original.affine, original.shape, 1, -1000.0, mode="nearest")
    np.testing.assert_array_equal(back, 100.0)
    ramp = np.arange(67, dtype=np.float32)[:, None, None] * np.ones(work.shape, np.float32)
    back = resample_to_grid(ramp, work.affine, original.affine, original.shape, 1, mode="nearest")
    assert back[-1, 0, 0] == 66 and back[3, 0, 0] == pytest.approx(2.0)  # linear inside, edge outside
    with pytest.raises(ValueError, match="mode"):
        resample_to_grid(values, work.affine, original.affine, original.shape, 1, mode="edge")


def test_sample_world_through_affine():
    aff = oblique_affine()
    arr = np.random.default_rng(1).random((6, 6, 6)).astype(np.float32)
    ijk = np.array([[1, 2, 3], [4, 0, 5]])
    vals = sample_world(arr, aff, voxel_to_world(aff, ijk), order=1)
    np.testing.assert_allclose(vals, arr[tuple(ijk.T)], rtol=1e-5)
    assert sample_world(arr, aff, voxel_to_world(aff, [[50, 50, 50]]), order=1, cval=-7)[0] == -7


def test_float_masks_are_cast_and_schemes_mapped(tmp_path):
    m = np.zeros((5, 5, 5))
    m[1:3, 1:3, 1:3] = 31.0000001  # TotalSegmentator L1, float storage
    path = write_nifti(tmp_path / "m.nii.gz", m)
    mask = load_mask(path, "totalseg")
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, 20}


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "not found"),
        ("corrupt_gzip", "corrupt or truncated gzip"),
        ("truncated_gzip", "corrupt or truncated gzip"),
        ("not_nifti", "not a readable NIfTI"),
        ("nan", "NaN"),
    ],
)
def test_bad_ct_files_name_the_file(tmp_path, setup, match):
    path = tmp_path / "ct.nii.gz"
    if setup == "corrupt_gzip":
        path.write_bytes(b"\x1f\x8b\x08\x00garbage-that-is-not-deflate" * 10)
    elif setup == "truncated_gzip":
        write_nifti(path, np.ones((20, 20, 20), np.float32))
        path.write_bytes(path.read_bytes()[:200])
    elif setup == "not_nifti":
        with gzip.open(path, "wb") as f:
            f.write(b"hello, I am not an image" * 50)
    elif setup == "nan":
        arr = np.zeros((4, 4, 4), np.float32)
        arr[1, 1, 1] = np.nan
        write_nifti(path, arr)
    with pytest.raises(InputError, match=match) as err:
        load_ct(path)
    assert str(path) in str(err.value)


def test_bad_masks_name_the_file(tmp_path):
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(InputError, match="no vertebra labels") as err:
        load_mask(empty)
    assert str(empty) in str(err.value)
    frac = write_nifti(tmp_path / "prob.nii.gz", np.full((4, 4, 4), 0.5, np.float32))
    with pytest.raises(InputError, match="non-integer"):
        load_mask(frac)


def test_ct_mask_mismatch(tmp_path):
    ct = write_nifti(tmp_path / "ct.nii.gz", np.zeros((6, 6, 6), np.int16))
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 20
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    bad_affine = write_nifti(tmp_path / "m1.nii.gz", lab, shifted)
    bad_shape = write_nifti(tmp_path / "m2.nii.gz", np.pad(lab, 1))
    with pytest.raises(InputError, match="affine does not match"):
        load_case(ct, bad_affine)
    with pytest.raises(InputError, match="shape"):
        load_case(ct, bad_shape)
    ok = write_nifti(tmp_path / "m3.nii.gz", lab)
    c, m = load_case(ct, ok)
    check_same_grid(c, m)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results" / "page"
    with atomic_dir(target) as work:  # the parent is created
        (work / "index.html").write_text("first")
    assert sorted(p.name for p in target.iterdir()) == ["index.html"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder's mode, not mkdtemp's private one
    with pytest.raises(RuntimeError), atomic_dir(target) as work:
        (work / "index.html").write_text("half")
        raise RuntimeError("a sample failed")
    assert (target / "index.html").read_text() == "first"  # the earlier page is untouched
    with atomic_dir(target) as work:
        (work / "other.png").write_bytes(b"x")
    assert sorted(p.name for p in target.iterdir()) == ["other.png"]  # replaced, not merged
    assert sorted(p.name for p in target.parent.iterdir()) == ["page"]  # no temporary folder left

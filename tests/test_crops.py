"""The crop store: finds crops, decodes once, memory-maps a disk cache, names bad files."""

import json

import numpy as np
import pytest

from data.crops import CropGeometry, CropStore, grid_warnings, record_grids, straightened_dir
from tests.conftest import write_nifti
from util.errors import InputError


def _crops(root, key="p1_20", shape=(8, 6, 4)):
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    label = np.zeros(shape, np.uint8)
    label[2:6, 1:4, 1:3] = 20
    ct = (np.arange(np.prod(shape)) % 256).reshape(shape).astype(np.uint8)
    write_nifti(root / "straightened" / "label" / f"{key}.nii.gz", label, aff)
    write_nifti(root / "straightened" / "CT" / f"{key}.nii.gz", ct, aff)
    return label, ct


def test_store_lists_decodes_and_caches(tmp_path):
    label, ct = _crops(tmp_path)
    (tmp_path / "straightened" / "label" / ".p1_20.nii.gz.abc.tmp.nii.gz").write_bytes(b"")
    store = CropStore(tmp_path)  # given the dataset root, it uses straightened/
    assert store.folder == tmp_path / "straightened" and store.keys() == ["p1_20"]
    crop = store.load("p1_20")
    assert crop.pid == "p1" and crop.vid == 20 and crop.ct.dtype == np.uint8
    np.testing.assert_array_equal(crop.label, label)
    np.testing.assert_array_equal(crop.ct, ct)
    np.testing.assert_allclose(crop.spacing_mm, 2.0)
    assert store.load("p1_20") is crop


def test_disk_cache_is_memory_mapped_and_equal(tmp_path):
    label, ct = _crops(tmp_path)
    CropStore(tmp_path / "straightened", cache_dir=str(tmp_path / "cache")).load("p1_20")
    again = CropStore(tmp_path / "straightened", cache_dir=str(tmp_path / "cache")).load("p1_20")
    assert isinstance(again.label, np.memmap)
    np.testing.assert_array_equal(again.ct, ct)


def test_bad_crops_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no straightened crops"):
        straightened_dir(tmp_path)
    _crops(tmp_path)
    write_nifti(
        tmp_path / "straightened" / "CT" / "p1_20.nii.gz",
        np.full((8, 6, 4), 900, np.int16),
        np.diag([2.0, 2.0, 2.0, 1.0]),
    )
    with pytest.raises(InputError, match=r"CT/p1_20.nii.gz: values outside 0-255"):
        CropStore(tmp_path).load("p1_20")


def test_geometry_from_the_header_and_its_comparison(tmp_path):
    _crops(tmp_path, shape=(8, 6, 4))
    g = CropStore(tmp_path).geometry("p1_20")
    assert g == CropGeometry((8, 6, 4), (2.0, 2.0, 2.0))
    assert g.extent_mm == (16.0, 12.0, 8.0)
    assert g.describe() == "8 x 6 x 4 voxels of 2 x 2 x 2 mm (16 x 12 x 8 mm)"
    assert CropGeometry.from_dict(g.as_dict()) == g
    assert not g.differs_from(g)
    # the same field of view at another voxel size differs (anatomy at another scale)
    assert g.differs_from(CropGeometry((16, 12, 8), (1.0, 1.0, 1.0)))
    # another field of view at the same voxel size differs
    assert g.differs_from(CropGeometry((8, 8, 4), (2.0, 2.0, 2.0)))
    # within 10 % on every axis it does not
    assert not g.differs_from(CropGeometry((8, 6, 4), (2.1, 2.1, 2.1)))
    assert g.differs_from(CropGeometry((8, 6, 4), (2.3, 2.0, 2.0)))
    with pytest.raises(ValueError, match="3 sizes"):
        CropGeometry.from_dict({"shape": [8, 6], "spacing_mm": [2.0, 2.0, 2.0]})


def test_bad_headers_are_not_geometries(tmp_path):
    _crops(tmp_path)
    write_nifti(tmp_path / "straightened" / "label" / "p1_21.nii.gz", np.zeros((8, 6), np.uint8), np.eye(4))
    write_nifti(tmp_path / "straightened" / "CT" / "p1_21.nii.gz", np.zeros((8, 6), np.uint8), np.eye(4))
    store = CropStore(tmp_path)
    with pytest.raises(InputError, match=r"label/p1_21.nii.gz: not a 3D crop: shape \(8, 6\)"):
        store.geometry("p1_21")
    write_nifti(
        tmp_path / "straightened" / "label" / "p1_22.nii.gz", np.zeros((8, 6, 4, 1), np.uint8), np.eye(4)
    )
    write_nifti(
        tmp_path / "straightened" / "CT" / "p1_22.nii.gz", np.zeros((8, 6, 4, 1), np.uint8), np.eye(4)
    )
    assert CropStore(tmp_path).geometry("p1_22").shape == (8, 6, 4)  # a trailing 1 is dropped


def test_recorded_grids_and_the_warnings_against_them(tmp_path):
    _crops(tmp_path, "p1_20", shape=(8, 6, 4))
    _crops(tmp_path, "p1_21", shape=(8, 6, 4))
    _crops(tmp_path, "p2_20", shape=(12, 6, 4))
    store = CropStore(tmp_path)
    run = tmp_path / "runs" / "hv"
    record_grids(store, ["p1_20", "p1_21", "p1_20"], run)  # a repeated key counts once
    record = json.loads((run / "train_crops.json").read_text())
    assert record == {"geometries": [{"shape": [8, 6, 4], "spacing_mm": [2.0, 2.0, 2.0], "crops": 2}]}
    assert grid_warnings(store, ["p1_20", "p1_21"], {"hv": run}) == []
    (line,) = grid_warnings(store, store.keys(), {"hv": run})
    assert line == (
        "warning: 1 crop(s) here are 12 x 6 x 4 voxels of 2 x 2 x 2 mm (24 x 12 x 8 mm); run 'hv' was "
        "trained on 8 x 6 x 4 voxels of 2 x 2 x 2 mm (16 x 12 x 8 mm). Its results may be unusable: "
        "straighten with --crop_mm 16 12 8 --spacing_mm 2 to match"
    )
    assert grid_warnings(store, store.keys(), {"old": tmp_path / "runs" / "old"}) == []  # no record

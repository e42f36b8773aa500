"""The on-disk caches of decoded crops and attention maps serve only the very files they were
decoded from: not a crop rewritten since, nor the same name in another dataset or --cam_folder."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from data.aligned_sagittal_dataset import AlignedSagittalDataset
from data.crops import CropStore
from tests.conftest import write_nifti
from tests.test_aligned_dataset import _opt as dataset_opt
from util.atomic import write_json

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])


def _crop_pair(root, key, shape, ct_offset):
    """A label crop with vertebrae 19/20/21 and a CT whose value says the row (plus ``ct_offset``)."""
    label = np.zeros(shape, np.uint8)
    for vid, (a, b) in {19: (4, 14), 20: (18, 30), 21: (34, 44)}.items():
        label[a:b, 5:15, 1:11] = vid
    ct = ((np.arange(shape[0]) * 5 + ct_offset) % 256)[:, None, None] + np.zeros(shape, np.int64)
    write_nifti(root / "straightened" / "label" / f"{key}.nii.gz", label, AFFINE)
    write_nifti(root / "straightened" / "CT" / f"{key}.nii.gz", ct.astype(np.uint8), AFFINE)
    return label, ct.astype(np.uint8)


def _age(path, seconds=100.0):
    """Set a file's times ``seconds`` into the past (a crop written before the cache was)."""
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


# --- the disk cache of decoded crops ------------------------------------------------------------
def test_crop_cache_is_not_served_after_the_ct_crop_is_rewritten(tmp_path):
    shape = (48, 20, 12)
    _crop_pair(tmp_path, "p1_20", shape, ct_offset=0)
    cache = str(tmp_path / "cache")
    CropStore(tmp_path, cache_dir=cache).load("p1_20")  # decoded and cached
    # the CT crop is rewritten (re-windowed, re-straightened ...) after the cache was written
    ct_path = tmp_path / "straightened" / "CT" / "p1_20.nii.gz"
    new_ct = np.full(shape, 77, np.uint8)
    write_nifti(ct_path, new_ct, AFFINE)
    t = os.stat(ct_path).st_mtime + 10
    os.utime(ct_path, (t, t))
    crop = CropStore(tmp_path, cache_dir=cache).load("p1_20")
    np.testing.assert_array_equal(crop.ct, new_ct)  # not the stale CT of the cache


def test_crop_cache_shared_by_two_dataroots_keeps_their_crops_apart(tmp_path):
    """The same crop name in two datasets (two phantoms, two spacings, real vs phantom)."""
    a, b = tmp_path / "a", tmp_path / "b"
    _crop_pair(a, "p1_20", (48, 20, 12), ct_offset=0)
    label_b, ct_b = _crop_pair(b, "p1_20", (40, 16, 12), ct_offset=3)
    for f in (b / "straightened" / "label" / "p1_20.nii.gz", b / "straightened" / "CT" / "p1_20.nii.gz"):
        _age(f)  # dataset b existed before the cache was written for a
    cache = str(tmp_path / "cache")
    CropStore(a, cache_dir=cache).load("p1_20")
    crop = CropStore(b, cache_dir=cache).load("p1_20")
    assert crop.label.shape == label_b.shape  # b's crop, not a's
    np.testing.assert_array_equal(crop.ct, ct_b)


def test_cam_cache_shared_by_two_cam_folders_keeps_their_maps_apart(tmp_path):
    shape = (48, 20, 12)
    _crop_pair(tmp_path, "p1_20", shape, ct_offset=0)
    write_json(tmp_path / "vertebra_data.json", {"train": {"p1_20": 0}})
    cam_a = np.full(shape, 0.25, np.float32)
    cam_b = np.full(shape, 0.75, np.float32)
    write_nifti(tmp_path / "cams_a" / "p1_20.nii.gz", cam_a, AFFINE)
    write_nifti(tmp_path / "cams_b" / "p1_20.nii.gz", cam_b, AFFINE)
    _age(tmp_path / "cams_b" / "p1_20.nii.gz")

    def dataset(cams):
        cache = str(tmp_path / "cache")
        return AlignedSagittalDataset(
            dataset_opt(tmp_path, cam_folder=str(tmp_path / cams), crop_cache_dir=cache)
        )

    assert float(dataset("cams_a")[0]["cam_target"].max()) == pytest.approx(0.25)
    assert float(dataset("cams_b")[0]["cam_target"].max()) == pytest.approx(0.75)  # not cams_a's map


# --- what a rewrite leaves behind --------------------------------------------------------------
def _cache_files(cache, key):
    """The cache files of crop ``key`` (``<key>_<16 hex digits>_<what>.npy``)."""
    return sorted(
        p.name for p in cache.glob("*.npy") if re.fullmatch(rf"{key}_[0-9a-f]{{16}}_\w+\.npy", p.name)
    )


def test_crop_cache_of_a_rewritten_crop_replaces_the_old_files(tmp_path):
    shape = (48, 20, 12)
    _crop_pair(tmp_path, "p1_20", shape, ct_offset=0)
    _crop_pair(tmp_path, "p1_2", shape, ct_offset=3)  # a key that prefixes the other
    for f in (tmp_path / "straightened").rglob("*.nii.gz"):
        _age(f)
    cache = tmp_path / "cache"
    CropStore(tmp_path, cache_dir=str(cache)).load("p1_20")
    CropStore(tmp_path, cache_dir=str(cache)).load("p1_2")
    before = _cache_files(cache, "p1_20")
    assert len(before) == 3
    _, new_ct = _crop_pair(tmp_path, "p1_20", shape, ct_offset=7)  # rewritten: new times
    crop = CropStore(tmp_path, cache_dir=str(cache)).load("p1_20")
    np.testing.assert_array_equal(crop.ct, new_ct)
    after = _cache_files(cache, "p1_20")
    assert len(after) == 3 and not set(after) & set(before)  # the old version is gone
    assert len(_cache_files(cache, "p1_2")) == 3  # the other crop's files stay


def test_crop_cache_keeps_another_datasets_entry_of_the_same_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _crop_pair(a, "p1_20", (48, 20, 12), ct_offset=0)
    _crop_pair(b, "p1_20", (40, 20, 12), ct_offset=9)
    cache = tmp_path / "cache"
    CropStore(a, cache_dir=str(cache)).load("p1_20")
    CropStore(b, cache_dir=str(cache)).load("p1_20")
    assert len(_cache_files(cache, "p1_20")) == 6  # both datasets' arrays, none pruned
    crop = CropStore(a, cache_dir=str(cache)).load("p1_20")  # served, not re-decoded
    assert crop.label.shape == (48, 20, 12)


def test_cam_cache_of_a_rewritten_map_replaces_the_old_file(tmp_path):
    shape = (48, 20, 12)
    _crop_pair(tmp_path, "p1_20", shape, ct_offset=0)
    write_json(tmp_path / "vertebra_data.json", {"train": {"p1_20": 0}})
    cam_path = tmp_path / "cams" / "p1_20.nii.gz"
    write_nifti(cam_path, np.full(shape, 0.25, np.float32), AFFINE)
    _age(cam_path)
    cache = tmp_path / "cache"

    def first_cam():
        opt = dataset_opt(tmp_path, cam_folder=str(tmp_path / "cams"), crop_cache_dir=str(cache))
        return float(AlignedSagittalDataset(opt)[0]["cam_target"].max())

    assert first_cam() == pytest.approx(0.25)
    old = sorted(p.name for p in cache.glob("p1_20_*_cam.npy"))
    write_nifti(cam_path, np.full(shape, 0.75, np.float32), AFFINE)
    assert first_cam() == pytest.approx(0.75)
    new = sorted(p.name for p in cache.glob("p1_20_*_cam.npy"))
    assert len(old) == len(new) == 1 and old != new

"""Dataset modes aligned_sagittal / aligned_coronal on tiny synthetic crops with known answers."""

import argparse
import logging

import numpy as np
import pytest
import torch

import data.aligned_sagittal_dataset as sag
from data.aligned_coronal_dataset import AlignedCoronalDataset
from data.aligned_sagittal_dataset import AlignedSagittalDataset
from tests.conftest import write_nifti
from util.atomic import write_json
from util.errors import InputError

SHAPE = (48, 20, 12)  # rows (2 mm), AP, LR
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])
SPLIT = {
    "train": {"p1_19": 0, "p1_20": 0, "p1_21": 2},
    "val": {"p2_20": 0, "p2_21": 0, "p3_20": 0},  # p3 has no crop
    "test": {},
}


def _volumes():
    """Three box vertebrae 19/20/21 on rows 4-13, 18-29, 34-43; CT value 5*row + LR slice."""
    label = np.zeros(SHAPE, np.uint8)
    for vid, (a, b) in {19: (4, 14), 20: (18, 30), 21: (34, 44)}.items():
        label[a:b, 5:15, 1:11] = vid
    rows = np.arange(SHAPE[0])[:, None, None] * 5
    ct = (rows + np.arange(SHAPE[2])[None, None, :] + np.zeros(SHAPE, int)).astype(np.uint8)
    return ct, label


@pytest.fixture
def root(tmp_path):
    ct, label = _volumes()
    t13 = np.where(label == 19, 28, label).astype(np.uint8)  # p2 has a T13 (28) between T12 and L1
    for key in ("p1_19", "p1_20", "p1_21", "p2_20", "p2_21"):
        lab = t13 if key.startswith("p2") else label
        write_nifti(tmp_path / "straightened" / "label" / f"{key}.nii.gz", lab, AFFINE)
        write_nifti(tmp_path / "straightened" / "CT" / f"{key}.nii.gz", ct, AFFINE)
    write_json(tmp_path / "vertebra_data.json", SPLIT)
    return tmp_path


def _opt(root, **kw):
    base = dict(
        dataroot=str(root / "straightened"),
        vertebra_json=None,
        cam_folder=None,
        vert_class="normal",
        normal_max_grade=0,
        mask_height_mm=32.0,
        phase="train",
        isTrain=True,
        seed=0,
        crop_cache_dir=None,
        min_area_mm2=50.0,
        hole_margin_mm=4.0,
        slice_fraction=0.8,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_sample_contract_and_known_values(root):
    ds = AlignedSagittalDataset(_opt(root))
    assert ds.keys == ["p1_19", "p1_20"]  # normal only; p1_21 is grade 2
    s = ds[1]
    assert s["key"] == "p1_20" and s["path"] == f"p1_20_s{int(s['slice_index'])}"
    for k in ("ct", "ct_masked", "hole", "target_mask", "neighbour_mask", "cam", "cam_target"):
        assert s[k].shape == (1, 48, 20) and s[k].dtype == torch.float32, k
    for k in ("slice_ratio", "height", "row_spacing_mm"):
        assert s[k].shape == (1,) and s[k].dtype == torch.float32, k
    for k in ("x1", "x2", "band_top", "band_bottom", "hole_rows", "grade", "slice_index"):
        assert s[k].shape == (1,) and s[k].dtype == torch.int64, k
    assert (int(s["x1"]), int(s["x2"]), float(s["height"])) == (18, 30, 12.0)
    assert (int(s["hole_rows"]), int(s["band_top"]), int(s["band_bottom"])) == (16, 16, 32)  # 32 mm / 2 mm
    assert float(s["row_spacing_mm"]) == 2.0 and int(s["grade"]) == 0
    z = int(s["slice_index"])
    assert 2 <= z <= 9  # the central 8 of the 10 slices 1..10
    assert float(s["slice_ratio"]) == pytest.approx(abs(z - 5.5) / 10 * 2)
    ct_rows = s["ct_masked"][0, :, 0].numpy()
    np.testing.assert_allclose(ct_rows[:16], (np.arange(2, 18) * 5 + z) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(ct_rows[32:], (np.arange(30, 46) * 5 + z) / 127.5 - 1, atol=1e-6)
    assert (ct_rows[16:32] == -1).all()
    # neighbours: 19 (grade 0) shifted up by 2 rows; 21 (grade 2) is not normal
    nm = s["neighbour_mask"][0, :, 7].numpy()
    assert nm[2:12].all() and nm.sum() == 10
    assert s["target_mask"][0, 18:30, 5:15].all() and s["target_mask"].sum() == 120
    assert (int(s["upper_vid"]), int(s["lower_vid"])) == (19, 21)
    assert s["cam"].abs().sum() == 0


def test_validation_takes_the_central_slice_deterministically(root):
    ds = AlignedSagittalDataset(_opt(root, phase="val", isTrain=False))
    assert ds.keys == ["p2_20", "p2_21"]  # p3_20 has no crop: skipped
    first = [int(ds[i]["slice_index"]) for i in range(len(ds))]
    ds.set_epoch(7)
    assert first == [int(ds[i]["slice_index"]) for i in range(len(ds))] == [5, 5]
    s = ds[0]  # p2_20: T13 above (not in the split: not a normal neighbour), L2 below (normal)
    assert (int(s["upper_vid"]), int(s["lower_vid"])) == (28, 21)
    nm = s["neighbour_mask"][0, :, 7].numpy()
    assert nm[:16].sum() == 0 and nm[36:46].all() and nm.sum() == 10
    assert torch.equal(ds[0]["ct_masked"], ds[0]["ct_masked"])


def test_training_slices_are_reproducible_per_seed_epoch_and_index(root):
    a = AlignedSagittalDataset(_opt(root))
    b = AlignedSagittalDataset(_opt(root))

    def draws(ds, epoch):
        ds.set_epoch(epoch)
        return [int(ds[i]["slice_index"]) for i in range(len(ds))]

    per_epoch = [draws(a, e) for e in range(1, 9)]
    assert per_epoch == [draws(b, e) for e in range(1, 9)]  # a fresh instance (a resumed run) agrees
    assert per_epoch[3] == draws(a, 4)  # revisiting an epoch gives the same slices
    assert len({tuple(d) for d in per_epoch}) > 1  # and epochs differ
    assert set(np.ravel(per_epoch)) <= set(range(2, 10))
    other_seed = AlignedSagittalDataset(_opt(root, seed=1))
    assert [draws(other_seed, e) for e in range(1, 9)] != per_epoch


def test_empty_split_and_empty_selection_are_clear_errors(root):
    with pytest.raises(InputError, match=r"vertebra_data.json: split 'test' is empty or missing"):
        AlignedSagittalDataset(_opt(root, phase="test", isTrain=False))
    with pytest.raises(InputError, match=r"split 'val' has no abnormal vertebrae"):
        AlignedSagittalDataset(_opt(root, phase="val", vert_class="abnormal"))
    with pytest.raises(InputError, match="--vert_class 'sick'"):
        AlignedSagittalDataset(_opt(root, vert_class="sick"))
    assert AlignedSagittalDataset(_opt(root, vert_class="abnormal")).keys == ["p1_21"]
    assert len(AlignedSagittalDataset(_opt(root, vert_class="all"))) == 3
    assert AlignedSagittalDataset(_opt(root, normal_max_grade=2)).keys == ["p1_19", "p1_20", "p1_21"]


def test_zero_cam_is_logged_once(root, caplog, monkeypatch):
    monkeypatch.setattr(sag, "_ZERO_CAM_LOGGED", False)
    with caplog.at_level(logging.WARNING, logger="data.aligned_sagittal_dataset"):
        ds = AlignedSagittalDataset(_opt(root))
        AlignedSagittalDataset(_opt(root, phase="val", isTrain=False))
        for i in range(len(ds)):
            ds[i]
    assert sum("zero map" in r.getMessage() for r in caplog.records) == 1


def test_cam_maps_are_read_cached_and_shifted(root, tmp_path):
    cams = tmp_path / "heatmap"
    cam = np.broadcast_to(np.linspace(0, 1, SHAPE[0], dtype=np.float32)[:, None, None], SHAPE).copy()
    for key in ("p1_19", "p1_20"):
        write_nifti(cams / f"{key}.nii.gz", cam, AFFINE)
    ds = AlignedSagittalDataset(_opt(root, cam_folder=str(cams), crop_cache_dir=str(tmp_path / "cache")))
    s = ds[1]
    got = s["cam"][0, :, 0].numpy()
    np.testing.assert_allclose(got[:16], cam[2:18, 0, 0], atol=1e-3)  # float16 cache
    np.testing.assert_allclose(got[32:], cam[30:46, 0, 0], atol=1e-3)
    assert (got[16:32] == 0).all()
    # cam_target: the same map on the rows of ct (the target's rows included), for HGAM's L1 weight
    np.testing.assert_allclose(s["cam_target"][0, :, 0].numpy(), cam[:, 0, 0], atol=1e-3)
    assert s["cam_target"][0, 18:30].min() > 0
    assert ds.cam_volume("p1_20", SHAPE, AFFINE) is ds.cam_volume("p1_20", SHAPE, AFFINE)
    again = AlignedSagittalDataset(_opt(root, cam_folder=str(cams), crop_cache_dir=str(tmp_path / "cache")))
    assert isinstance(again.cam_volume("p1_20", SHAPE, AFFINE), np.memmap)
    (cams / "p1_19.nii.gz").unlink()
    with pytest.raises(InputError, match=r"p1_19.nii.gz: CAM map not found \(1 of 2 missing\)"):
        AlignedSagittalDataset(_opt(root, cam_folder=str(cams)))


def test_taller_than_the_hole_and_no_valid_slice(root):
    s = AlignedSagittalDataset(_opt(root, mask_height_mm=10.0))[1]  # 5 rows < 12-row target
    assert int(s["hole_rows"]) == 14 and (int(s["band_top"]), int(s["band_bottom"])) == (17, 31)
    assert (s["ct_masked"][0, 17:31] == -1).all()
    ds = AlignedSagittalDataset(_opt(root, min_area_mm2=1000.0))
    with pytest.raises(InputError, match=r"label/p1_19.nii.gz: vertebra 19 covers less than"):
        ds[0]


def test_small_target_pieces_are_ignored_and_volumes_never_modified(root):
    ct, label = _volumes()
    label[44:46, 16:18, :] = 20  # a 4-pixel stray piece of the target on every slice
    write_nifti(root / "straightened" / "label" / "p1_20.nii.gz", label, AFFINE)
    ds = AlignedSagittalDataset(_opt(root))
    before = ds.store.load("p1_20").label.copy()
    s = ds[1]
    assert (int(s["x1"]), int(s["x2"])) == (18, 30) and s["target_mask"][0, 44:46].sum() == 0
    np.testing.assert_array_equal(ds.store.load("p1_20").label, before)
    assert int(AlignedSagittalDataset(_opt(root, min_area_mm2=1.0))[1]["x2"]) == 46


def test_coronal_gives_the_same_image_size_padded_and_centred(root):
    ds = AlignedCoronalDataset(_opt(root, phase="val", isTrain=False))
    s = ds[0]
    assert s["ct"].shape == (1, 48, 20) and (int(s["col_start"]), int(s["col_stop"])) == (4, 16)
    assert int(s["slice_index"]) == 9  # AP extent 5..14: centre 9.5, nearest valid 9 (first of the tie)
    ct = s["ct"][0].numpy()
    assert (ct[:, :4] == -1).all() and (ct[:, 16:] == -1).all()
    np.testing.assert_allclose(ct[10, 4:16], (50 + np.arange(12)) / 127.5 - 1, atol=1e-6)
    assert s["target_mask"][0, 18:30, 5:15].all() and s["target_mask"].sum() == 120  # LR 1..10 + 4
    assert (int(s["x1"]), int(s["x2"]), int(s["hole_rows"])) == (18, 30, 16)
    assert s["cam_target"].shape == (1, 48, 20) and s["cam_target"].sum() == 0  # no --cam_folder


def test_dataset_root_options_and_workers(root):
    from data import create_dataset
    from options.train_options import TrainOptions

    args = ["--model", "tests.fixtures.tiny_model", "--dataset_mode", "aligned_coronal"]
    args += ["--dataroot", str(root), "--batch_size", "2", "--num_threads", "2", "--mask_height_mm", "32"]
    opt = TrainOptions().parse(args)
    assert opt.plane == "coronal" and opt.crop_cache_dir is None and opt.min_area_mm2 == 50
    loader = create_dataset(opt)  # the dataset root: straightened/ and vertebra_data.json found there
    ds = loader.dataset
    assert isinstance(ds, AlignedCoronalDataset) and len(ds) == 2
    for epoch in (1, 2, 3):
        loader.set_epoch(epoch)  # reaches the persistent worker processes
        batches = list(loader)
        keys = [k for b in batches for k in b["key"]]
        assert sorted(keys) == ["p1_19", "p1_20"]
        got = {k: int(z) for b in batches for k, z in zip(b["key"], b["slice_index"][:, 0], strict=True)}
        want = {ds.keys[i]: int(ds[i]["slice_index"]) for i in range(len(ds))}
        assert got == want, epoch
        assert batches[0]["ct_masked"].shape == (2, 1, 48, 20) and batches[0]["x1"].shape == (2, 1)


@pytest.mark.slow
def test_straightened_phantom_samples_in_both_planes(phantom_2mm, tmp_path):
    """Real crops: every vertebra of every split gives a sample; heights agree with the truth."""
    import csv
    import shutil

    from straighten import straighten_mask_3d

    root = tmp_path / "copy"
    shutil.copytree(phantom_2mm / "raw", root / "raw")
    shutil.copy(phantom_2mm / "vertebra_data.json", root / "vertebra_data.json")
    assert straighten_mask_3d.main(["--dataroot", str(root), "--spacing_mm", "2.0", "--workers", "2"]) == 0
    with open(phantom_2mm / "truth" / "vertebrae.csv") as f:
        truth = {f"{r['pid']}_{r['vid']}": r for r in csv.DictReader(f)}
    for cls in (AlignedSagittalDataset, AlignedCoronalDataset):
        for phase in ("train", "val", "test"):
            ds = cls(_opt(root, dataroot=str(root), phase=phase, vert_class="all", mask_height_mm=40.0))
            for i in range(len(ds)):
                s = ds[i]
                assert s["ct"].shape == s["cam"].shape == (1, 128, 128)
                assert (
                    int(s["hole_rows"]) == 20
                    and (s["ct_masked"][0, int(s["band_top"]) : int(s["band_bottom"])] == -1).all()
                )
                vid = int(s["key"].rpartition("_")[2])
                assert int(s["upper_vid"]) == vid - 1  # T9-L5 drawn whole, with a T8 above
                assert int(s["lower_vid"]) == (0 if vid == 24 else vid + 1)  # the sacrum is not one
                row = truth[s["key"]]
                if cls is AlignedSagittalDataset and int(row["grade"]) == 0:
                    healthy = max(float(row[f"healthy_{r}_mm"]) for r in ("anterior", "middle", "posterior"))
                    # the slice's row extent (largest over its columns, tilt included) is at least the
                    # median column height and at most 3 voxels more
                    assert -2.0 <= float(s["height"]) * 2.0 - healthy <= 6.0, s["key"]


def test_the_options_record_the_plane_the_slices_are_cut_in(root):
    """--plane coronal with aligned_sagittal trains on sagittal slices: opt.json must say sagittal,
    or the 3D synthesis would run the run's generator on coronal slices."""
    opt = _opt(root, plane="coronal")
    AlignedSagittalDataset(opt)
    assert opt.plane == "sagittal"
    opt = _opt(root, plane="sagittal")
    AlignedCoronalDataset(opt)
    assert opt.plane == "coronal"

"""Fracture classifier and Grad-CAM++ maps: slicing helpers, the network, both scripts end to end."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from Attention import grad_CAM_3d_sagittal, train_classifier
from Attention.classifier import (
    ClassifierConfig,
    build_classifier,
    config_path,
    load_classifier,
    parameter_count,
)
from Attention.dataset import binary_metrics, binary_targets
from Attention.slices import (
    height_band,
    inside_outside_means,
    put_slices,
    remove_band,
    take_slices,
    target_slices,
    window_slices,
)
from straighten import straighten_mask_3d
from tests.conftest import write_nifti
from util.checkpoint import save_checkpoint
from util.errors import InputError

PATIENTS = ("phantom000", "phantom002")  # the val and train patients of the phantom_2mm split


# --- pure helpers -------------------------------------------------------------------------------
def test_target_slices_and_put_take_round_trip():
    label = np.zeros((8, 6, 10), np.uint8)
    label[2:5, 1:4, 3:7] = 20
    assert target_slices(label, 20, "sagittal").tolist() == [3, 4, 5, 6]
    assert target_slices(label, 20, "coronal").tolist() == [1, 2, 3]
    assert target_slices(label, 20, "sagittal", central_fraction=0.5).tolist() == [4, 5]
    assert target_slices(label, 21, "sagittal").size == 0
    idx = np.array([3, 5])
    maps = np.random.default_rng(0).random((2, 8, 6)).astype(np.float32)
    vol = put_slices(label.shape, idx, maps, "sagittal")
    np.testing.assert_array_equal(take_slices(vol, idx, "sagittal"), maps)
    np.testing.assert_array_equal(vol[:, :, 3], maps[0])  # a sagittal slice is at fixed axis 2
    assert vol[:, :, [0, 1, 2, 4, 6, 7, 8, 9]].max() == 0
    with pytest.raises(ValueError):
        target_slices(label, 20, "axial")


def test_height_band_and_remove_band():
    label = np.zeros((10, 4, 4), np.uint8)
    label[3:6, 1:3, 1:3] = 7
    assert height_band(label, 7) == (3, 5)
    images = np.ones((2, 10, 4), np.float32)
    cut = remove_band(images, height_band(label, 7))
    assert cut[:, 3:6].max() == 0 and cut[:, :3].min() == 1 and cut[:, 6:].min() == 1
    assert images.min() == 1  # the input is left alone


def test_window_stays_inside_the_image():
    rows, cols = window_slices((20, 10), (1.0, 9.0), (8, 4))
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 8, 6, 10)
    rows, cols = window_slices((20, 10), (10.0, 5.0), (30, 4))
    assert (rows.start, rows.stop) == (0, 20) and cols.stop - cols.start == 4


def test_inside_outside_means():
    heat = np.zeros((4, 4, 4), np.float32)
    body = np.zeros((4, 4, 4), bool)
    body[1:3, 1:3, 1] = True
    heat[body] = 1.0
    inside, outside = inside_outside_means(heat, body, np.array([1]), "sagittal")
    assert inside == 1.0 and outside == 0.0


def test_binary_targets_and_metrics():
    assert binary_targets({"a_1": 0, "a_2": 1, "a_3": 2, "a_4": 3}, 2) == {"a_1": 0, "a_3": 1, "a_4": 1}
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert m["auc"] == 1.0 and m["sensitivity"] == 1.0 and m["specificity"] == 0.5
    m = binary_metrics(np.array([0, 1]), np.array([0.9, 0.1]))
    assert m["auc"] == 0.0 and m["sensitivity"] == 0.0 and m["specificity"] == 0.0
    assert np.isnan(binary_metrics(np.array([0, 0]), np.array([0.2, 0.3]))["auc"])


# --- the network --------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_classifier_shapes_and_backward(size):
    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(width=8))
    x = torch.rand(3, 1, *size, requires_grad=True)
    out = model(x)
    assert out.shape == (3, 2)
    out[:, 1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    seen = []
    model.cam_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(torch.rand(1, 1, *size))
    assert seen == [(1, 64, size[0] // 16, size[1] // 16)]  # the maps come from a 1/16-scale layer


def test_default_classifier_is_small():
    assert parameter_count(build_classifier(ClassifierConfig())) <= 5_000_000


def test_load_classifier_round_trip_and_wrong_architecture(tmp_path):
    config = ClassifierConfig(width=8)
    model = build_classifier(config).eval()
    ckpt = tmp_path / "classifier.pth"
    save_checkpoint(model.state_dict(), ckpt)
    (tmp_path / "classifier.json").write_text(json.dumps(config.to_json()))
    assert set(torch.load(ckpt, weights_only=True)) == set(model.state_dict())
    loaded, cfg = load_classifier(ckpt)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert cfg.width == 8
    save_checkpoint(build_classifier(ClassifierConfig(width=12)).state_dict(), ckpt)
    with pytest.raises(InputError, match="another architecture"):
        load_classifier(ckpt)


# --- the scripts on a straightened phantom --------------------------------------------------------
@pytest.fixture(scope="module")
def straight_2mm(phantom_2mm, tmp_path_factory):
    """Two patients of the session phantom (train and val), straightened at 2 mm, with a train/val split."""
    root = tmp_path_factory.mktemp("attention_2mm")
    for pid in PATIENTS:
        shutil.copytree(phantom_2mm / "raw" / pid, root / "raw" / pid)
    split = json.loads((phantom_2mm / "vertebra_data.json").read_text())
    keep = {
        name: {k: g for k, g in entries.items() if k.rpartition("_")[0] in PATIENTS}
        for name, entries in split.items()
    }
    (root / "vertebra_data.json").write_text(json.dumps({k: v for k, v in keep.items() if v}))
    assert straighten_mask_3d.main(["--dataroot", str(root), "--spacing_mm", "2", "--workers", "2"]) == 0
    return root


@pytest.fixture(scope="module")
def trained(straight_2mm, tmp_path_factory):
    ckpts = tmp_path_factory.mktemp("attention_ckpt")
    args = [
        "--dataroot",
        str(straight_2mm),
        "--checkpoints_dir",
        str(ckpts),
        "--name",
        "cls",
        "--gpu_ids",
        "-1",
    ]
    small = ["--n_epochs", "1", "--iters_per_epoch", "2", "--batch_size", "4", "--width", "8"]
    assert train_classifier.main(args + small) == 0
    return ckpts / "cls" / "classifier.pth"


@pytest.mark.slow
def test_training_smoke_writes_weights_only_checkpoint(trained):
    state = torch.load(trained, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    saved = json.loads(trained.with_suffix(".json").read_text())
    assert (
        saved["arch"] == "se_resnet2d" and saved["width"] == 8 and saved["spacing_mm"] == pytest.approx(2.0)
    )
    assert len(saved["extra"]["history"]) == 1 and "val_auc" in saved["extra"]["history"][0]


@pytest.mark.slow
def test_maps_on_the_crop_grid(straight_2mm, trained, capsys):
    args = [
        "--dataroot",
        str(straight_2mm),
        "--checkpoint",
        str(trained),
        "--gpu_ids",
        "-1",
        "--shard",
        "0/8",
    ]
    assert grad_CAM_3d_sagittal.main(args + ["--batch_size", "8"]) == 0
    crops = sorted((straight_2mm / "straightened" / "CT").glob("*.nii.gz"))[0::8]
    assert crops
    for ct_path in crops:
        key = ct_path.name[: -len(".nii.gz")]
        heat = nib.load(str(straight_2mm / "heatmap" / ct_path.name))
        ct = nib.load(str(ct_path))
        label = np.asarray(nib.load(str(straight_2mm / "straightened" / "label" / ct_path.name)).dataobj)
        data = np.asarray(heat.dataobj)
        assert data.shape == ct.shape and np.allclose(heat.affine, ct.affine, atol=1e-4)
        assert data.dtype == np.float32 and data.min() >= 0 and data.max() <= 1
        vid = int(key.rpartition("_")[2])
        cut = np.any(label == vid, axis=(0, 1))
        assert data[:, :, ~cut].max() == 0  # nothing off the slices through the target
        assert data[:, :, cut].max() > 0.99  # every map is min-max normalised (unless it is flat)
        assert (straight_2mm / "heatmap" / "png" / f"{key}.png").stat().st_size > 0
    # a rerun skips finished maps; the masked input makes other maps
    assert grad_CAM_3d_sagittal.main(args) == 0
    assert "wrote 0 unmasked sagittal maps" in capsys.readouterr().out
    out = straight_2mm / "heatmap_masked"
    assert grad_CAM_3d_sagittal.main(args + ["--cam_input", "masked", "--out", str(out), "--no_png"]) == 0
    first = crops[0].name
    assert not np.array_equal(
        np.asarray(nib.load(str(out / first)).dataobj),
        np.asarray(nib.load(str(straight_2mm / "heatmap" / first)).dataobj),
    )


def _one_line_error(capsys, rc: int, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err and expected in err


@pytest.fixture
def tiny_crops(tmp_path):
    """Two 32x32x8 crops of patient p0 (vertebrae 20 and 21) and a split naming both."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for vid in (20, 21):
        label = np.zeros((32, 32, 8), np.uint8)
        label[12:20, 10:22, 2:6] = vid
        write_nifti(tmp_path / "straightened" / "label" / f"p0_{vid}.nii.gz", label, affine)
        write_nifti(tmp_path / "straightened" / "CT" / f"p0_{vid}.nii.gz", label * 5, affine)
    (tmp_path / "vertebra_data.json").write_text(
        json.dumps({"train": {"p0_20": 0, "p0_21": 3}, "val": {"p0_20": 0}})
    )
    return tmp_path


def test_missing_checkpoint_exits_2(tiny_crops, capsys):
    args = ["--dataroot", str(tiny_crops), "--checkpoint", str(tiny_crops / "no.pth")]
    _one_line_error(capsys, grad_CAM_3d_sagittal.main(args), "checkpoint not found")
    assert not (tiny_crops / "heatmap").exists()


def test_checkpoint_of_another_architecture_exits_2(tiny_crops, capsys):
    ckpt = tiny_crops / "other.pth"
    save_checkpoint(torch.nn.Linear(4, 2).state_dict(), ckpt)
    rc = grad_CAM_3d_sagittal.main(["--dataroot", str(tiny_crops), "--checkpoint", str(ckpt)])
    _one_line_error(capsys, rc, "another architecture")
    assert not (tiny_crops / "heatmap").exists()


@pytest.mark.parametrize(
    "split, expected",
    [
        ({"train": {"p0_20": 0, "p0_99": 3}, "val": {"p0_20": 0}}, "no straightened crop in"),
        ({"train": {}, "val": {"p0_20": 0}}, "empty or missing"),
        ({"train": {"p0_20": 0, "p0_21": 3}, "val": {}}, "'val' is empty or missing"),
    ],
    ids=["unknown-vertebra", "empty-train-split", "empty-val-split"],
)
def test_bad_split_exits_2(tiny_crops, capsys, split, expected):
    split_file = tiny_crops / "split.json"
    split_file.write_text(json.dumps(split))
    args = [
        "--dataroot",
        str(tiny_crops),
        "--vertebra_json",
        str(split_file),
        "--checkpoints_dir",
        str(tiny_crops),
    ]
    _one_line_error(capsys, train_classifier.main(args + ["--gpu_ids", "-1"]), expected)
    assert not (tiny_crops / "classifier").exists()


def test_tiny_crops_train_and_map(tiny_crops):
    """The same scripts on 32-voxel crops: one iteration, then maps for both crops."""
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(tiny_crops), "--gpu_ids", "-1"]
    small = ["--n_epochs", "1", "--iters_per_epoch", "1", "--batch_size", "2", "--width", "4"]
    assert train_classifier.main(args + small) == 0
    ckpt = tiny_crops / "classifier" / "classifier.pth"
    assert (
        grad_CAM_3d_sagittal.main(["--dataroot", str(tiny_crops), "--checkpoint", str(ckpt), "--no_png"]) == 0
    )
    heat = np.asarray(nib.load(str(tiny_crops / "heatmap" / "p0_21.nii.gz")).dataobj)
    assert heat.shape == (32, 32, 8) and heat[:, :, [0, 1, 6, 7]].max() == 0 and heat.max() <= 1
    out = tiny_crops / "fractured_only"
    cam_args = ["--dataroot", str(tiny_crops), "--checkpoint", str(ckpt), "--out", str(out), "--no_png"]
    assert grad_CAM_3d_sagittal.main(cam_args + ["--min_grade", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["p0_21.nii.gz"]
    assert grad_CAM_3d_sagittal.main(cam_args + ["--plane", "coronal", "--overwrite"]) == 2  # learnt sagittal


def test_rerun_with_other_options_is_refused_unless_overwrite(tiny_crops, capsys):
    """A classifier already there is kept only for a command that would learn the same one."""
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(tiny_crops), "--gpu_ids", "-1"]
    small = ["--n_epochs", "1", "--iters_per_epoch", "1", "--batch_size", "2", "--width", "4"]
    assert train_classifier.main(args + small) == 0
    ckpt = tiny_crops / "classifier" / "classifier.pth"
    before = ckpt.stat().st_mtime_ns
    capsys.readouterr()
    # the same options (a moved cache or another device do not count): kept as it is
    assert train_classifier.main(args + small + ["--cache_dir", str(tiny_crops / "cache")]) == 0
    assert "not training again" in capsys.readouterr().out and ckpt.stat().st_mtime_ns == before
    other = small + ["--central_fraction", "0.3"]
    _one_line_error(capsys, train_classifier.main(args + other), "--central_fraction 0.6 there, 0.3 now")
    assert ckpt.stat().st_mtime_ns == before
    _one_line_error(capsys, train_classifier.main(args + small + ["--seed", "3"]), "--seed 0 there, 3 now")
    assert train_classifier.main(args + other + ["--overwrite"]) == 0
    assert (
        train_classifier.saved_option_changes(ckpt, train_classifier.build_parser().parse_args(args + other))
        == []
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_and_maps_on_cuda(straight_2mm, tmp_path):
    args = [
        "--dataroot",
        str(straight_2mm),
        "--checkpoints_dir",
        str(tmp_path),
        "--name",
        "cls",
        "--gpu_ids",
        "0",
    ]
    assert train_classifier.main(args + ["--n_epochs", "1", "--iters_per_epoch", "2"]) == 0
    ckpt = str(tmp_path / "cls" / "classifier.pth")
    out = str(tmp_path / "maps")
    assert (
        grad_CAM_3d_sagittal.main(
            [
                "--dataroot",
                str(straight_2mm),
                "--checkpoint",
                ckpt,
                "--out",
                out,
                "--gpu_ids",
                "0",
                "--shard",
                "0/8",
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "option, expected",
    [
        (["--window_mm", "nan"], "--window_mm must be a finite number >= 0"),
        (["--window_mm", "inf"], "--window_mm must be a finite number >= 0"),
        (["--window_mm", "-8"], "--window_mm must be a finite number >= 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be a finite number >= 0"),
        (["--width", "0"], "--width must be >= 1"),
        (["--blocks", "1", "0", "1", "1"], "--blocks must all be >= 1"),
        (["--central_fraction", "nan"], "--central_fraction must be in (0, 1]"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
    ],
)
def test_classifier_options_are_refused_before_any_work(tmp_path, capsys, monkeypatch, option, expected):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(train_classifier, "CropStore", no_work)
    args = ["--dataroot", str(tmp_path / "missing"), "--checkpoints_dir", str(tmp_path), "--gpu_ids", "-1"]
    _one_line_error(capsys, train_classifier.main(args + option), expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("under", [False, True], ids=["file", "under-a-file"])
def test_cam_out_that_cannot_be_a_folder_is_refused_before_any_work(tiny_crops, capsys, monkeypatch, under):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(grad_CAM_3d_sagittal, "load_classifier", no_work)
    afile = tiny_crops / "afile"
    afile.write_text("")
    out = afile / "maps" if under else afile
    rc = grad_CAM_3d_sagittal.main(["--dataroot", str(tiny_crops), "--out", str(out), "--gpu_ids", "-1"])
    _one_line_error(capsys, rc, f"error: {out}: --out is not a folder")


def test_cam_write_failure_is_one_error_line(tiny_crops, capsys, monkeypatch):
    config = ClassifierConfig(width=4)
    ckpt = tiny_crops / "cls" / "classifier.pth"
    save_checkpoint(build_classifier(config).state_dict(), ckpt)
    (ckpt.parent / "classifier.json").write_text(json.dumps(config.to_json()))
    out = tiny_crops / "maps"
    (out / "png").parent.mkdir()
    (out / "png").write_text("")  # the overlays' folder is a file
    args = ["--dataroot", str(tiny_crops), "--checkpoint", str(ckpt), "--out", str(out), "--gpu_ids", "-1"]
    assert grad_CAM_3d_sagittal.main(args) == 2
    lines = capsys.readouterr().err.splitlines()  # the progress bar, ended, then one error line
    assert lines[-1] == f"error: {out / 'png' / 'p0_20.png'}: cannot write: {out / 'png'}: File exists"
    assert "Traceback" not in "".join(lines) and not lines[-2].startswith("error")
    assert sorted(p.name for p in out.iterdir()) == ["png"]  # no map left without its overlay

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out / ".p0_20.nii.gz.tmp"))

    monkeypatch.setattr(grad_CAM_3d_sagittal, "save_like", read_only)
    assert grad_CAM_3d_sagittal.main(args + ["--no_png"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"error: {out / 'p0_20.nii.gz'}: cannot write: Permission denied"


def test_window_under_one_voxel_is_refused(tiny_crops, capsys):
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(tiny_crops), "--gpu_ids", "-1"]
    rc = train_classifier.main(args + ["--window_mm", "0.5"])  # 2 mm voxels
    _one_line_error(capsys, rc, "--window_mm 0.5 is under one voxel (2 x 2 mm)")
    assert not (tiny_crops / "classifier").exists()


def test_a_classifier_is_reused_only_with_its_record_and_the_same_split(tiny_crops, capsys):
    """Weights without their classifier.json (a run stopped between the two writes), a JSON from
    before the split was recorded, or another split's contents: not reused without --overwrite."""
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(tiny_crops), "--gpu_ids", "-1"]
    small = ["--n_epochs", "1", "--iters_per_epoch", "1", "--batch_size", "2", "--width", "4"]
    assert train_classifier.main(args + small) == 0
    ckpt = tiny_crops / "classifier" / "classifier.pth"
    record = json.loads(config_path(ckpt).read_text())
    assert len(record["extra"]["split_sha256"]) == 16
    # the same split written again in another layout is the same split
    split = tiny_crops / "vertebra_data.json"
    split.write_text(json.dumps(json.loads(split.read_text()), indent=4))
    capsys.readouterr()
    assert train_classifier.main(args + small) == 0 and "not training again" in capsys.readouterr().out
    # train and val swapped
    swapped = tiny_crops / "swapped.json"
    swapped.write_text(json.dumps({"train": {"p0_20": 0, "p0_21": 3}, "val": {"p0_21": 3}}))
    rc = train_classifier.main(args + small + ["--vertebra_json", str(swapped)])
    _one_line_error(capsys, rc, "another split file contents there")
    del record["extra"]["split_sha256"]
    config_path(ckpt).write_text(json.dumps(record))
    _one_line_error(capsys, train_classifier.main(args + small), "the split file not recorded there")
    config_path(ckpt).unlink()
    _one_line_error(capsys, train_classifier.main(args + small), "no classifier.json beside the weights")
    assert train_classifier.main(args + small + ["--overwrite"]) == 0
    assert config_path(ckpt).exists()


def test_a_checkpoints_folder_that_cannot_be_made_is_refused_before_training(tiny_crops, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the folder was checked")

    monkeypatch.setattr(train_classifier, "CropStore", no_work)
    afile = tiny_crops / "afile"
    afile.write_text("")
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(afile), "--gpu_ids", "-1"]
    rc = train_classifier.main(args)
    _one_line_error(
        capsys, rc, f"{afile / 'classifier'}: the classifier's folder is not a folder ({afile} is a file)"
    )


def test_label_only_crops_are_named_as_such(tiny_crops, capsys):
    for p in (tiny_crops / "straightened" / "CT").iterdir():
        p.unlink()
    args = ["--dataroot", str(tiny_crops), "--checkpoints_dir", str(tiny_crops), "--gpu_ids", "-1"]
    _one_line_error(capsys, train_classifier.main(args), "have a label crop but no CT crop")

"""Grad-CAM++ maps on the pixels their cells are centred on, reruns that never keep maps of another
classifier, input or crop, and train patients reported when they also sit in val or test."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from Attention import grad_CAM_3d_sagittal, train_classifier
from Attention.classifier import ClassifierConfig, SqueezeExcite, build_classifier, config_path
from Attention.grad_CAM_3d_sagittal import CamMaker
from tests.conftest import write_nifti
from util.atomic import write_json
from util.checkpoint import save_checkpoint


# --- the map lands where the feature cell looks ---------------------------------------------------
def _centre_tap_classifier() -> nn.Module:
    """An SE-ResNet whose channel 0 passes the input through every layer by its centre tap, so the
    last block's cell (i, j) sees exactly the input pixels around (16 i, 16 j) (stride 16), and whose
    class-1 logit is the mean of that channel: Grad-CAM++ of class 1 is then that channel itself."""
    model = build_classifier(ClassifierConfig(width=4)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, SqueezeExcite):
                squeeze, excite = module.gate[1], module.gate[3]
                squeeze.weight.zero_(), squeeze.bias.zero_()
                excite.weight.zero_(), excite.bias.fill_(20.0)  # gate = 1
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and ".gate." not in name:
                module.weight.zero_()
                k = module.kernel_size[0] // 2
                module.weight[0, 0, k, k] = 1.0
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
            elif isinstance(module, nn.Linear):
                module.weight.zero_(), module.bias.zero_()
                module.weight[1, 0] = 1.0
    return model


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (100, 136)])
def test_cam_lands_on_the_receptive_field_of_its_cell(size):
    """A bright 5x5 square at (48, 80) lights exactly one cell of the 1/16 feature map, the one whose
    receptive field is centred on pixel (48, 80); the map must peak there, not half a cell (7.5
    pixels) further down and right, where resizing the cell grid as if it covered the image puts it."""
    model = _centre_tap_classifier()
    image = np.zeros((1, *size), np.float32)
    image[0, 46:51, 78:83] = 1.0
    cam = CamMaker(model, torch.device("cpu"))(image)[0]
    assert cam.shape == size and cam.max() == pytest.approx(1.0, abs=1e-3)
    rows, cols = np.indices(size)
    centre = (float((cam * rows).sum() / cam.sum()), float((cam * cols).sum() / cam.sum()))
    peak = np.unravel_index(np.argmax(cam), size)
    assert centre == pytest.approx((48.0, 80.0), abs=1.0), centre
    assert abs(peak[0] - 48) <= 1 and abs(peak[1] - 80) <= 1, peak


# --- reruns never keep maps made by another classifier, input or crop ---------------------------
@pytest.fixture
def crops(tmp_path):
    """Two 32x48x8 crops of patient p0 (vertebrae 20 and 21) with textured CT, and a split."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for vid in (20, 21):
        label = np.zeros((32, 48, 8), np.uint8)
        label[12:20, 10:30, 2:6] = vid
        ct = (rng.random(label.shape) * 60 + (label > 0) * 150).astype(np.uint8)
        write_nifti(tmp_path / "straightened" / "label" / f"p0_{vid}.nii.gz", label, affine)
        write_nifti(tmp_path / "straightened" / "CT" / f"p0_{vid}.nii.gz", ct, affine)
    (tmp_path / "vertebra_data.json").write_text(json.dumps({"train": {"p0_20": 0, "p0_21": 3}}))
    return tmp_path


def _save_classifier(path, seed: int) -> None:
    torch.manual_seed(seed)
    config = ClassifierConfig(width=4)
    model = build_classifier(config)
    with torch.no_grad():  # running statistics of a trained net, so BN in eval mode is not degenerate
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.running_mean.uniform_(-0.2, 0.2)
    save_checkpoint(model.state_dict(), path)
    write_json(config_path(path), config.to_json())


def _map(root, key="p0_21", folder="heatmap"):
    return np.asarray(nib.load(str(root / folder / f"{key}.nii.gz")).dataobj)


def _redone_or_refused(capsys, rc: int, before: np.ndarray, after: np.ndarray) -> None:
    """A rerun must either make the map again or refuse with one error line (exit 2) that says how
    to redo it; exiting 0 with the old map in place is the defect."""
    err = capsys.readouterr().err.strip()
    if rc == 0:
        assert not np.array_equal(before, after), "the stale map was kept and the run reported success"
    else:
        assert rc == 2 and err.startswith("error: ") and "\n" not in err and "--overwrite" in err, err
        assert np.array_equal(before, after)


def _first_maps(crops):
    """Maps of a classifier (seed 0) written into ``crops``: the run's arguments, checkpoint and map."""
    ckpt = crops / "cls" / "classifier.pth"
    _save_classifier(ckpt, seed=0)
    args = ["--dataroot", str(crops), "--checkpoint", str(ckpt), "--gpu_ids", "-1", "--no_png"]
    assert grad_CAM_3d_sagittal.main(args) == 0
    return args, ckpt, _map(crops)


def test_rerun_after_a_new_classifier_does_not_keep_the_old_maps(crops, capsys):
    args, ckpt, before = _first_maps(crops)
    _save_classifier(ckpt, seed=1)  # what train_classifier.py --overwrite does to the same path
    capsys.readouterr()
    rc = grad_CAM_3d_sagittal.main(args)
    _redone_or_refused(capsys, rc, before, _map(crops))


def test_rerun_with_the_other_cam_input_does_not_keep_the_old_maps(crops, capsys):
    args, _, before = _first_maps(crops)
    capsys.readouterr()
    rc = grad_CAM_3d_sagittal.main(args + ["--cam_input", "masked"])
    _redone_or_refused(capsys, rc, before, _map(crops))


def test_rerun_after_a_crop_is_rewritten_makes_its_map_again(crops):
    ckpt = crops / "cls" / "classifier.pth"
    _save_classifier(ckpt, seed=0)
    args = ["--dataroot", str(crops), "--checkpoint", str(ckpt), "--gpu_ids", "-1", "--no_png"]
    assert grad_CAM_3d_sagittal.main(args) == 0
    before = _map(crops)
    ct_path = crops / "straightened" / "CT" / "p0_21.nii.gz"
    img = nib.load(str(ct_path))
    write_nifti(ct_path, np.ascontiguousarray(np.asarray(img.dataobj)[::-1]), img.affine)  # re-straightened
    later = (crops / "heatmap" / "p0_21.nii.gz").stat().st_mtime + 10
    os.utime(ct_path, (later, later))
    assert grad_CAM_3d_sagittal.main(args) == 0
    after = _map(crops)
    assert not np.array_equal(before, after), "the map of the old crop was kept"
    # and it is the map of the new crop: the same as one made from scratch
    assert grad_CAM_3d_sagittal.main(args + ["--overwrite", "--out", str(crops / "fresh")]) == 0
    np.testing.assert_array_equal(after, _map(crops, folder="fresh"))


# --- validation on patients the classifier did not train on --------------------------------------
def test_patient_in_train_and_val_is_reported(crops, capsys):
    """Every vertebra of a patient shares its anatomy, scanner and windowing: a val split holding a
    train patient measures memory, not generalisation, and the AUC printed and saved is inflated.
    The run must say so (naming the patient) and record it beside the metrics it saves."""
    split = crops / "leaky.json"
    split.write_text(json.dumps({"train": {"p0_20": 0, "p0_21": 3}, "val": {"p0_21": 3}}))
    args = ["--dataroot", str(crops), "--vertebra_json", str(split), "--checkpoints_dir", str(crops)]
    small = ["--n_epochs", "1", "--iters_per_epoch", "1", "--batch_size", "2", "--width", "4"]
    assert train_classifier.main(args + small + ["--gpu_ids", "-1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert any("'val'" in line and "p0" in line for line in warnings), warnings
    saved = json.loads((crops / "classifier" / "classifier.json").read_text())
    assert saved["extra"].get("patients_shared_with_train") == {"val": ["p0"]}

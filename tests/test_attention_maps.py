"""Grad-CAM++ maps on the pixels their cells are centred on, scaled per slice or per vertebra, reruns
that never keep maps of another classifier, input, scaling or crop, and train patients reported when
they also sit in val or test."""

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
from Attention.grad_CAM_3d_sagittal import CamMaker, cell_weights, vertebra_scaled
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


# --- per slice or per vertebra --------------------------------------------------------------------
STRENGTHS = (1.0, 0.5, 0.01)  # the raw map's peak on each of three slices


def _known_raw_maps(monkeypatch):
    """Make the package's raw Grad-CAM++ map (before its ReLU and per-slice min-max) the input image
    read on the cell grid (pixel ``16 i`` for cell ``i``); the package's forward pass, ReLU and
    normalisation still run. Returns three 64x64 slices: on slice ``n`` the cell (1, 2) is
    ``STRENGTHS[n]``, the cell (3, 1) 0.3 of it, and one cell is negative (clipped by the ReLU)."""
    from pytorch_grad_cam.base_cam import BaseCAM

    def raw(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        cells = input_tensor[:, 0, ::16, ::16].detach().cpu().numpy()
        return cells[:, : activations.shape[2], : activations.shape[3]]

    monkeypatch.setattr(BaseCAM, "get_cam_image", raw)
    images = np.zeros((3, 64, 64), np.float32)
    for n, strength in enumerate(STRENGTHS):
        images[n, 16, 32] = strength
        images[n, 48, 16] = 0.3 * strength
        images[n, 0, 48] = -strength
    return images


@pytest.mark.parametrize("batch_size", [2, 32], ids=["batches", "one-batch"])
def test_vertebra_norm_keeps_the_slices_relative_strength(monkeypatch, batch_size):
    """Per slice every slice's peak is 1, the faintest (0.01) as the strongest; per vertebra the
    peaks keep their raw strengths 1, 0.5, 0.01, across batches too; both keep 0.3 of the peak on
    the weaker cell and 0 where the raw map is negative."""
    images = _known_raw_maps(monkeypatch)
    model = build_classifier(ClassifierConfig(width=4)).eval()
    cpu = torch.device("cpu")
    per_slice = CamMaker(model, cpu, batch_size)(images)
    per_vertebra = CamMaker(model, cpu, batch_size, norm="vertebra")(images)
    for maps, peaks in ((per_slice, (1.0, 1.0, 1.0)), (per_vertebra, STRENGTHS)):
        assert maps.shape == images.shape and maps.dtype == np.float32
        np.testing.assert_allclose(maps[:, 16, 32], peaks, rtol=1e-5)
        np.testing.assert_allclose(maps.max(axis=(1, 2)), peaks, rtol=1e-5)
        np.testing.assert_allclose(maps[:, 48, 16], 0.3 * np.array(peaks), rtol=1e-5)
        assert maps[:, 0, 48].max() == 0 and maps.min() >= 0


def test_vertebra_scaled_divides_by_the_largest_value():
    raw = np.array([[[2.0, 0.0]], [[1.0, 0.02]]])
    np.testing.assert_array_equal(vertebra_scaled(raw), [[[1.0, 0.0]], [[0.5, 0.01]]])
    np.testing.assert_array_equal(vertebra_scaled(np.zeros((2, 1, 2))), np.zeros((2, 1, 2)))


def test_default_norm_is_the_packages_per_slice_map():
    """The default (``slice``) is the map the script wrote before ``--cam_norm`` existed: the
    package's own per-slice normalised cells, placed on their pixels."""
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class OnCells(GradCAMPlusPlus):
        def get_target_width_height(self, input_tensor):
            return None

    torch.manual_seed(0)
    model = build_classifier(ClassifierConfig(width=4)).eval()
    images = np.random.default_rng(0).random((5, 64, 48)).astype(np.float32)
    cells = OnCells(model=model, target_layers=[model.cam_layer])(
        input_tensor=torch.from_numpy(images).unsqueeze(1), targets=[ClassifierOutputTarget(1)] * 5
    )
    rows, cols = cell_weights(64, cells.shape[1], 16), cell_weights(48, cells.shape[2], 16)
    expected = np.clip(np.einsum("Hh,nhw,Ww->nHW", rows, cells, cols).astype(np.float32), 0, 1)
    np.testing.assert_array_equal(CamMaker(model, torch.device("cpu"))(images), expected)


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


def test_rerun_with_the_other_cam_norm_is_refused_unless_overwrite(crops, capsys):
    args, _, before = _first_maps(crops)
    record = crops / "heatmap" / grad_CAM_3d_sagittal.MAPS_RECORD
    assert json.loads(record.read_text())["cam_norm"] == "slice"
    capsys.readouterr()
    rc = grad_CAM_3d_sagittal.main(args + ["--cam_norm", "vertebra"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "made with --cam_norm slice" in err and "--overwrite" in err
    np.testing.assert_array_equal(before, _map(crops))
    assert grad_CAM_3d_sagittal.main(args + ["--cam_norm", "vertebra", "--overwrite"]) == 0
    assert json.loads(record.read_text())["cam_norm"] == "vertebra"
    assert not np.array_equal(before, _map(crops))
    assert grad_CAM_3d_sagittal.main(args + ["--cam_norm", "vertebra"]) == 0  # the same: skipped
    assert "wrote 0 unmasked sagittal maps (per vertebra)" in capsys.readouterr().out


def test_record_from_before_cam_norm_counts_as_per_slice(crops, capsys):
    """A folder whose record has no ``cam_norm`` was made per slice: a default rerun keeps its maps,
    a ``--cam_norm vertebra`` one is refused."""
    args, _, before = _first_maps(crops)
    record = crops / "heatmap" / grad_CAM_3d_sagittal.MAPS_RECORD
    old = json.loads(record.read_text())
    del old["cam_norm"]
    record.write_text(json.dumps(old))
    capsys.readouterr()
    assert grad_CAM_3d_sagittal.main(args) == 0
    assert "wrote 0 unmasked sagittal maps" in capsys.readouterr().out
    rc = grad_CAM_3d_sagittal.main(args + ["--cam_norm", "vertebra"])
    err = capsys.readouterr().err
    assert rc == 2 and "made with --cam_norm slice" in err, err
    np.testing.assert_array_equal(before, _map(crops))


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


def test_maps_left_by_another_classifier_are_not_taken_for_finished(crops, capsys):
    """A partial --overwrite (here --min_grade 3: only p0_21) rewrites the folder's record for the
    new classifier; p0_20's map, still the old classifier's, must not pass as finished."""
    args, ckpt, _ = _first_maps(crops)
    before = _map(crops, "p0_20")
    _save_classifier(ckpt, seed=1)
    assert grad_CAM_3d_sagittal.main(args + ["--overwrite", "--min_grade", "3"]) == 0
    capsys.readouterr()
    rc = grad_CAM_3d_sagittal.main(args)
    _redone_or_refused(capsys, rc, before, _map(crops, "p0_20"))
    # and what it made is the new classifier's map
    assert grad_CAM_3d_sagittal.main(args + ["--overwrite", "--out", str(crops / "fresh")]) == 0
    np.testing.assert_array_equal(_map(crops, "p0_20"), _map(crops, "p0_20", folder="fresh"))


def test_a_map_from_before_maps_carried_their_digest_is_kept_by_the_record(crops, capsys):
    args, _, before = _first_maps(crops)
    path = crops / "heatmap" / "p0_21.nii.gz"
    img = nib.load(str(path))
    write_nifti(path, np.asarray(img.dataobj), img.affine)  # no description: an older map
    capsys.readouterr()
    assert grad_CAM_3d_sagittal.main(args) == 0
    assert "wrote 0 unmasked sagittal maps" in capsys.readouterr().out


def test_an_empty_selection_says_why_and_an_empty_shard_is_no_error(crops, capsys):
    args, _, _ = _first_maps(crops)
    (crops / "vertebra_data.json").write_text(json.dumps({"train": {"p0_20": 0, "p0_21": 2}}))
    capsys.readouterr()
    rc = grad_CAM_3d_sagittal.main(args + ["--min_grade", "3", "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no vertebra of grade >= 3 in the split has a crop in" in err and "\n" not in err, err
    assert grad_CAM_3d_sagittal.main(args + ["--shard", "5/8"]) == 0
    assert "shard 5/8: no crops to map" in capsys.readouterr().out


def test_a_rerun_that_wants_overlays_writes_the_missing_ones(crops, capsys):
    args, _, before = _first_maps(crops)  # made with --no_png
    args = [a for a in args if a != "--no_png"]
    capsys.readouterr()
    assert grad_CAM_3d_sagittal.main(args) == 0
    assert sorted(p.name for p in (crops / "heatmap" / "png").iterdir()) == ["p0_20.png", "p0_21.png"]
    np.testing.assert_array_equal(before, _map(crops))  # the same classifier: the same map
    assert grad_CAM_3d_sagittal.main(args) == 0
    assert "wrote 0 " in capsys.readouterr().out

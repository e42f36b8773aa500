"""Generation metrics: known values, synthesised slices only, the CLI, and the phantom truth."""

from __future__ import annotations

import csv
import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest

from data.crops import CropStore
from data.nifti_io import load_ct, load_mask, save_nifti
from evaluation import generation_eval_sagittal as gen_eval
from evaluation.eval_io import read_truth_table
from evaluation.generation_metrics import (
    PSNR_CAP_DB,
    full_height_share,
    image_metrics,
    overlap_metrics,
    plane_slices,
    psnr,
    ssim,
    synthesised_slices,
    truth_on_crop,
)
from util.errors import InputError

SHAPE = (40, 32, 24)


def box(shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[12:28, 8:24, 4:20] = True
    return m


def textured_ct(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ct = rng.integers(20, 60, SHAPE).astype(np.uint8)
    ct[box()] = rng.integers(150, 220, int(box().sum()))
    return ct


def test_identical_inputs_score_perfectly():
    ct, target = textured_ct(), box()
    slices = synthesised_slices(target, ct, "sagittal")
    assert slices.tolist() == list(range(4, 20))
    img = image_metrics(ct, ct, target, "sagittal", slices)
    assert img["ssim_global"] == pytest.approx(1.0) and img["ssim_band"] == pytest.approx(1.0)
    assert img["psnr_global"] == PSNR_CAP_DB and img["n_image_slices"] == 16
    assert overlap_metrics(target, target, "sagittal", slices) == {"dice": 1.0, "iou": 1.0, "rvd": 0.0}


def test_psnr_and_ssim_of_known_differences():
    a = np.zeros((16, 16))
    assert psnr(a, a + 25.5) == pytest.approx(20.0)  # MSE = (0.1 * 255)^2
    b = np.random.default_rng(1).uniform(0, 255, (16, 16))
    assert ssim(b, b) == pytest.approx(1.0)
    assert ssim(b, 255 - b) < 0
    assert math.isnan(ssim(np.zeros((2, 16)), np.zeros((2, 16))))


def test_overlap_counts_synthesised_slices_only():
    """The reference's synthesis left the outer 20 % of slices empty; that must not cost Dice."""
    target, ct = box(), textured_ct()
    fake_ct, fake = ct.copy(), target.copy()
    fake_ct[:, :, :6] = 0  # slices 4, 5 (and 18, 19 below) never synthesised
    fake_ct[:, :, 18:] = 0
    fake[:, :, :6] = False
    fake[:, :, 18:] = False
    slices = synthesised_slices(target, fake_ct, "sagittal")
    assert slices.tolist() == list(range(6, 18))
    assert overlap_metrics(target, fake, "sagittal", slices)["dice"] == 1.0
    whole = overlap_metrics(target, fake, "sagittal", np.arange(SHAPE[2]))["dice"]
    assert whole == pytest.approx(2 * 12 / (16 + 12))
    assert synthesised_slices(target, ct, "sagittal", central_fraction=0.5).tolist() == list(range(8, 16))


def test_full_height_share_of_known_shapes():
    every = np.arange(SHAPE[2])
    assert full_height_share(box(), "sagittal", every) == 1.0  # a box: every column is the tallest
    m = box()
    m[12, 8:16, :] = False  # sagittal slices: 8 of the 16 AP columns lose their top row
    assert full_height_share(m, "sagittal", every) == 0.5
    assert full_height_share(m, "sagittal", np.arange(4, 6)) == 0.5  # the chosen slices only
    m[12:14, 20:24, 4:8] = False  # four LR slices lose two more rows on 4 columns: 4/16 at the max
    assert full_height_share(m, "sagittal", every) == pytest.approx((12 * 8 + 4 * 4) / (16 * 16))
    # coronal slices (fixed AP) of the box: every LR column is the tallest too
    assert full_height_share(box(), "coronal", np.arange(SHAPE[1])) == 1.0
    assert math.isnan(full_height_share(np.zeros(SHAPE, bool), "sagittal", every))


def test_shape_metrics_keep_synthesis_and_reference_apart():
    body = box()
    body[12, 8:16, :] = False  # the reference: half its columns a row short
    flat = box()  # the synthesis fills the rows flat
    every = np.arange(SHAPE[2])
    assert gen_eval.shape_metrics(body, flat, "sagittal", every) == {
        "full_share": 1.0,
        "full_share_reference": 0.5,
    }


def test_band_is_the_targets_rows_and_planes_pick_the_axis():
    ct, target = textured_ct(), box()
    fake = ct.copy()
    fake[:12] = 0  # rows above the vertebra differ: the band does not see them
    slices = synthesised_slices(target, fake, "coronal")
    assert slices.tolist() == list(range(8, 24))
    assert plane_slices(ct, "coronal").shape == (32, 40, 24)
    img = image_metrics(ct, fake, target, "coronal", slices)
    assert img["ssim_band"] == pytest.approx(1.0) and img["ssim_global"] < 0.9


# --- the CLI ----------------------------------------------------------------------------------
AFFINE = np.diag([1.5, 1.5, 1.5, 1.0])


@pytest.fixture
def tiny(tmp_path):
    d, o = tmp_path / "D", tmp_path / "O"
    for i, vid in enumerate((19, 20)):
        labels = box().astype(np.uint8) * vid
        ct = textured_ct(i)
        for folder, arr in (("straightened/label", labels), ("straightened/CT", ct)):
            save_nifti(d / folder / f"p_{vid}.nii.gz", arr, AFFINE, dtype=np.uint8)
        save_nifti(o / "label_fake" / f"p_{vid}.nii.gz", labels, AFFINE, dtype=np.uint8)
        save_nifti(o / "CT_fake" / f"p_{vid}.nii.gz", ct, AFFINE, dtype=np.uint8)
    (d / "vertebra_data.json").write_text(
        json.dumps({"train": {}, "val": {"p_19": 0, "p_20": 0}, "test": {}})
    )
    return tmp_path


def test_cli_on_a_perfect_synthesis(tiny):
    r = tiny / "R"
    args = ["--dataroot", str(tiny / "D"), "--output-folder", str(tiny / "O"), "--result-folder", str(r)]
    assert gen_eval.main(args) == 0
    s = json.loads((r / "summary.json").read_text())["input"]
    assert s["n"] == 2 and s["dice"] == 1.0 and s["ssim_band"] == 1.0 and s["rvd"] == 0.0
    assert s["full_share"] == s["full_share_reference"]  # the same body, the same shape
    with open(r / "generation_eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["vertebra"] for row in rows] == ["p_19", "p_20"] and rows[0]["n_slices"] == "16"


def test_cli_bad_inputs_give_one_line(tiny, capsys):
    d, r = str(tiny / "D"), str(tiny / "Rbad")
    assert gen_eval.main(["--dataroot", d, "--output-folder", str(tiny / "nope"), "--result-folder", r]) == 2
    o = str(tiny / "O")
    assert (
        gen_eval.main(["--dataroot", d, "--output-folder", o, "--result-folder", r, "--phase", "test"]) == 2
    )
    assert gen_eval.main(["--dataroot", d, "--output-folder", o, "--result-folder", r, "--phase", "tst"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err), err
    assert not (tiny / "Rbad" / "summary.json").exists()


# --- against the phantom's truth --------------------------------------------------------------
@pytest.fixture(scope="module")
def fractured_phantom(tmp_path_factory):
    """One patient at 2 mm, T12-L2 all fractured, straightened."""
    from data.phantom import generate
    from straighten import straighten_mask_3d

    root = tmp_path_factory.mktemp("truth_phantom")
    generate(root, patients=1, seed=3, spacing_mm=2.0, levels="T12-L2", fracture_fraction=1.0, progress=False)
    assert straighten_mask_3d.main(["--dataroot", str(root), "--spacing_mm", "2.0"]) == 0
    return root


def write_truth_as_synthesis(root, out):
    """A 'synthesis' that is the true healthy anatomy resampled onto each crop."""
    store = CropStore(root)
    for key in store.keys():
        c = store.load(key)
        ct = load_ct(root / "truth" / c.pid / f"{c.pid}_healthy.nii.gz")
        m = load_mask(root / "truth" / c.pid / f"{c.pid}_healthy_msk.nii.gz")
        true_ct, true_body = truth_on_crop(
            ct.array, m.array, ct.affine, c.affine, c.label.shape, c.vid, (-300, 800)
        )
        labels = c.label.copy()
        labels[labels == c.vid] = 0
        labels[true_body] = c.vid
        save_nifti(out / "CT_fake" / f"{key}.nii.gz", true_ct, c.affine, dtype=np.uint8)
        save_nifti(out / "label_fake" / f"{key}.nii.gz", labels, c.affine, dtype=np.uint8)


@pytest.mark.slow
def test_truth_itself_has_no_height_error(fractured_phantom, tmp_path):
    root = fractured_phantom
    write_truth_as_synthesis(root, tmp_path / "O")
    args = [
        "--dataroot",
        str(root),
        "--output-folder",
        str(tmp_path / "O"),
        "--result-folder",
        str(tmp_path / "R"),
    ]
    assert gen_eval.main([*args, "--phase", "train", "--truth", str(root / "truth")]) == 0
    t = json.loads((tmp_path / "R" / "summary.json").read_text())["truth"]
    assert t["n"] == 3  # every level is fractured
    assert t["height_mae_measured_mm"] == 0.0
    assert t["height_mae_mm"] <= 1.5  # the measurement's own error at 2 mm voxels
    assert t["dice"] == 1.0 and t["ssim_band"] == pytest.approx(1.0)
    assert t["full_share"] == t["full_share_reference"] < 1.0  # the true body is no box

    # the input itself (no restoration) is far from the truth
    ident = tmp_path / "I"
    ident.mkdir()
    (ident / "CT_fake").symlink_to(root / "straightened" / "CT")
    (ident / "label_fake").symlink_to(root / "straightened" / "label")
    args = ["--dataroot", str(root), "--output-folder", str(ident), "--result-folder", str(tmp_path / "RI")]
    assert gen_eval.main([*args, "--phase", "train", "--truth", str(root / "truth")]) == 0
    t = json.loads((tmp_path / "RI" / "summary.json").read_text())["truth"]
    assert t["height_mae_mm"] > 3.0 and t["dice"] < 0.95


TRUTH_HEADER = (
    "pid,vid,grade,fracture_type,healthy_anterior_mm,healthy_middle_mm,healthy_posterior_mm,"
    "fractured_anterior_mm,fractured_middle_mm,fractured_posterior_mm\n"
)


def test_truth_table_reads_a_good_row(tmp_path):
    (tmp_path / "vertebrae.csv").write_text(TRUTH_HEADER + "p1,20,2,wedge,25,25,25,15,20,25\n")
    row = read_truth_table(tmp_path)[("p1", 20)]
    assert row.grade == 2 and row.reduction == pytest.approx([0.4, 0.2, 0.0])


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("p1,20,0,none,25,25,25,25,25\n", "row 1 has fewer fields than the header"),
        ("p1,20,0,none,25,25,25,25,25,25,9\n", "row 1 has more fields than the header"),
        (
            "p1,20,0,none,25,25,25,25,25,25\np2,20,0,none,n/a,25,25,25,25,25\n",
            "row 2, column healthy_anterior_mm: 'n/a'",
        ),
        (
            "p1,20,0,none,25,25,25,25,25,inf\n",
            "row 1, column fractured_posterior_mm: 'inf' is not a finite number",
        ),
        ("p1,L1,0,none,25,25,25,25,25,25\n", "row 1, column vid: 'L1' is not an integer"),
    ],
)
def test_truth_table_bad_rows_are_input_errors(tmp_path, body, problem):
    path = tmp_path / "vertebrae.csv"
    path.write_text(TRUTH_HEADER + body)
    with pytest.raises(InputError) as exc:
        read_truth_table(tmp_path)
    assert str(exc.value).startswith(f"{path}: {problem}")


def test_truth_table_of_another_kind_or_encoding_is_an_input_error(tmp_path):
    path = tmp_path / "vertebrae.csv"
    path.write_text("pid,vid\np1,20\n")
    with pytest.raises(InputError, match="lacks columns grade"):
        read_truth_table(tmp_path)
    path.write_bytes(TRUTH_HEADER.encode() + "p1,20,0,n\xf6ne,25,25,25,25,25,25\n".encode("latin-1"))
    with pytest.raises(InputError, match="not a readable UTF-8 CSV"):
        read_truth_table(tmp_path)


@pytest.mark.slow
def test_the_truth_of_another_phantom_is_refused(fractured_phantom, tmp_path, capsys):
    root = fractured_phantom
    write_truth_as_synthesis(root, tmp_path / "O")
    r = tmp_path / "R"
    args = ["--dataroot", str(root), "--output-folder", str(tmp_path / "O"), "--result-folder", str(r)]
    args += ["--phase", "train"]
    # another phantom's table: a grade that disagrees with the split file
    other = tmp_path / "other_truth"
    shutil.copytree(root / "truth", other)
    table = (other / "vertebrae.csv").read_text().splitlines()
    head, first = table[0].split(","), table[1].split(",")
    first[head.index("grade")] = "0"
    (other / "vertebrae.csv").write_text("\n".join([table[0], ",".join(first), *table[2:]]) + "\n")
    capsys.readouterr()
    assert gen_eval.main([*args, "--truth", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "the truth of another phantom?" in err and "\n" not in err, err
    # the right grades, but healthy volumes on another grid than the scan the crops were cut from
    shutil.copy(root / "truth" / "vertebrae.csv", other / "vertebrae.csv")
    pid = first[head.index("pid")]
    for name in (f"{pid}_healthy.nii.gz", f"{pid}_healthy_msk.nii.gz"):
        img = nib.load(str(other / pid / name))
        shifted = img.affine.copy()
        shifted[:3, 3] += 10.0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), str(other / pid / name))
    assert gen_eval.main([*args, "--truth", str(other)]) == 2
    assert "not on the grid of" in capsys.readouterr().err
    assert not (r / "summary.json").exists()
    assert gen_eval.main([*args, "--truth", str(root / "truth")]) == 0


def test_a_rerun_without_truth_leaves_no_truth_table_of_an_earlier_run(tiny):
    d, r = tiny / "D", tiny / "R"
    args = ["--dataroot", str(d), "--output-folder", str(tiny / "O"), "--result-folder", str(r)]
    r.mkdir()
    (r / "truth_eval.csv").write_text("pid,vid\np,20\n")  # what a run with --truth left
    assert gen_eval.main([*args, "--overwrite"]) == 0
    assert not (r / "truth_eval.csv").exists()
    assert "truth" not in json.loads((r / "summary.json").read_text())

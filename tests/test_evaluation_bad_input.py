"""Bad input to the evaluation scripts (RHLV, generation metrics, SVM grading): one clear error
(exit 2) naming the file, never a traceback, a silently dropped vertebra, partial output or
silently meaningless figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.nifti_io import save_nifti
from evaluation import RHLV_quantification, SVM_grading
from evaluation import generation_eval_sagittal as gen_eval
from tests import test_grading
from tests.test_grading import write_rhlv

SHAPE = (48, 48, 48)  # height, AP, LR
AFFINE = np.eye(4)


def box(rows=(16, 32)) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[rows[0] : rows[1], 6:42, 4:44] = True
    return m


def write_crop(root, key: str, labels: np.ndarray, ct: bool = False) -> None:
    save_nifti(root / "D" / "straightened" / "label" / f"{key}.nii.gz", labels, AFFINE, dtype=np.uint8)
    save_nifti(root / "O" / "label_fake" / f"{key}.nii.gz", labels, AFFINE, dtype=np.uint8)
    if ct:
        image = np.where(labels > 0, 200, 40).astype(np.uint8)
        save_nifti(root / "D" / "straightened" / "CT" / f"{key}.nii.gz", image, AFFINE, dtype=np.uint8)
        save_nifti(root / "O" / "CT_fake" / f"{key}.nii.gz", image, AFFINE, dtype=np.uint8)


def spine(root, vids=(19, 20, 21), ct: bool = False) -> None:
    """One crop per vertebra, each holding its box body with its neighbours above and below."""
    for i, vid in enumerate(vids):
        labels = np.zeros(SHAPE, np.uint8)
        labels[box()] = vid
        if i:
            labels[box((0, 12))] = vids[i - 1]
        if i + 1 < len(vids):
            labels[box((36, 48))] = vids[i + 1]
        write_crop(root, f"p_{vid}", labels, ct)


def write_split(root, split: dict) -> str:
    path = root / "D" / "vertebra_data.json"
    path.write_text(json.dumps(split))
    return str(path)


def rhlv_args(root, method: str, json_path: str | None = None) -> list[str]:
    args = ["--label-folder", str(root / "D" / "straightened" / "label"), "--result-folder", str(root / "Q")]
    args += ["--method", method]
    if method == "gan":
        args += ["--output-folder", str(root / "O")]
    if json_path:
        args += ["--json-path", json_path]
    return args


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


# --- RHLV_quantification.py -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["gan", "neighbors"])
def test_rhlv_a_file_that_is_no_crop_in_the_label_folder_is_one_error(tmp_path, capsys, method):
    """A stray file whose name is not <pid>_<vid> (here a whole-spine mask dropped beside the
    crops) made Measurer.__init__ raise a bare ValueError: a traceback, exit status 1."""
    spine(tmp_path)
    stray = tmp_path / "D" / "straightened" / "label" / "p_msk.nii.gz"
    save_nifti(stray, np.zeros(SHAPE, np.uint8), AFFINE, dtype=np.uint8)
    json_path = write_split(tmp_path, {"train": {"p_19": 0, "p_20": 0, "p_21": 0}})
    for args in (rhlv_args(tmp_path, method, json_path), rhlv_args(tmp_path, method)):
        assert RHLV_quantification.main(args) == 2
        line = one_error_line(capsys)
        assert "p_msk" in line and "<pid>_<" in line
    assert not (tmp_path / "Q" / "rhlv.csv").exists()


@pytest.mark.parametrize("method", ["gan", "neighbors"])
def test_rhlv_a_crop_of_an_unknown_vertebra_id_is_one_error_and_leaves_no_files(tmp_path, capsys, method):
    """Crop p_99 (label 99, not a VerSe id) in the split file: gan drew p_20's map, then died with a
    KeyError in the map title (a traceback and a partial result folder, against the docstring's
    'bad input leaves no files'); neighbors died with a KeyError in spine_rank."""
    spine(tmp_path, vids=(20, 99))
    json_path = write_split(tmp_path, {"train": {"p_20": 0, "p_99": 0}})
    assert RHLV_quantification.main(rhlv_args(tmp_path, method, json_path)) == 2
    line = one_error_line(capsys)
    assert "p_99" in line and "99" in line
    q = tmp_path / "Q"
    assert not q.exists() or not any(p.is_file() for p in q.rglob("*"))


@pytest.mark.parametrize("method", ["gan", "neighbors"])
def test_rhlv_a_crop_without_its_vertebra_is_one_error(tmp_path, capsys, method):
    """DESIGN: a vertebra absent is bad input, one clear error naming the file (the synthesis
    script refuses such a crop with exit 2). RHLV dropped the rhlv_folder vertebra from rhlv.csv
    without naming it (exit 0), so the grading silently lost a test vertebra."""
    spine(tmp_path)
    broken = np.zeros(SHAPE, np.uint8)
    broken[box((0, 12))] = 19  # p_20's crop holds its neighbour only
    write_crop(tmp_path, "p_20", broken)
    json_path = write_split(tmp_path, {"train": {"p_19": 0, "p_21": 0}, "test": {"p_20": 2}})
    assert RHLV_quantification.main(rhlv_args(tmp_path, method, json_path)) == 2
    line = one_error_line(capsys)
    assert "p_20.nii.gz" in line and "20" in line
    assert not (tmp_path / "Q" / "rhlv.csv").exists()


# --- generation_eval_sagittal.py --------------------------------------------------------------
def gen_args(root) -> list[str]:
    args = ["--dataroot", str(root / "D"), "--output-folder", str(root / "O")]
    return [*args, "--result-folder", str(root / "R")]


def test_generation_eval_a_crop_without_its_vertebra_is_one_error(tmp_path, capsys):
    """The grade-0 crop p_20 holds no voxel of 20: the row came out with every metric empty and
    the summary averaged the rest, exit 0, the file never named."""
    spine(tmp_path, ct=True)
    broken = np.zeros(SHAPE, np.uint8)
    broken[box((0, 12))] = 19
    write_crop(tmp_path, "p_20", broken, ct=True)
    write_split(tmp_path, {"val": {"p_19": 0, "p_20": 0, "p_21": 0}})
    assert gen_eval.main(gen_args(tmp_path)) == 2
    line = one_error_line(capsys)
    assert "p_20.nii.gz" in line
    assert not (tmp_path / "R" / "summary.json").exists()


def test_generation_eval_refuses_a_ct_fake_outside_0_255(tmp_path, capsys):
    """SSIM and PSNR use a data range of 255 (the crops' 0-255 window). A CT_fake in HU (or in
    [-1, 1]) was scored without a word: here a perfect synthesis, written in HU, got a band PSNR
    of -8.5 dB and a global SSIM of 0.007 (exit 0) instead of an error naming the file."""
    spine(tmp_path, ct=True)
    write_split(tmp_path, {"val": {"p_19": 0, "p_20": 0, "p_21": 0}})
    fake = tmp_path / "O" / "CT_fake" / "p_20.nii.gz"
    hu = np.where(box(), 700.0, -1000.0).astype(np.float32)
    save_nifti(fake, hu, AFFINE, dtype=np.float32)
    assert gen_eval.main(gen_args(tmp_path)) == 2
    line = one_error_line(capsys)
    assert "CT_fake" in line and "p_20.nii.gz" in line and "0-255" in line
    assert not (tmp_path / "R" / "summary.json").exists()


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_generation_eval_bad_min_area_is_one_error(tmp_path, capsys, value):
    """--min-area-mm2 nan raised 'cannot convert float NaN to integer' from deep inside the loop."""
    spine(tmp_path, ct=True)
    write_split(tmp_path, {"val": {"p_19": 0, "p_20": 0, "p_21": 0}})
    assert gen_eval.main([*gen_args(tmp_path), "--min-area-mm2", value]) == 2
    assert "--min-area-mm2" in one_error_line(capsys)


# --- SVM_grading.py ---------------------------------------------------------------------------
rhlv_folder = test_grading.rhlv_folder  # the graded rhlv.csv the grading tests use


@pytest.mark.parametrize("c", ["0", "-1", "nan"])
def test_svm_bad_c_is_one_error(rhlv_folder, capsys, c):
    """--C 0 reached sklearn's InvalidParameterError (a traceback) after the csv was read."""
    args = ["--rhlv-folder", str(rhlv_folder / "Q"), "--output-folder", str(rhlv_folder / "S"), "--C", c]
    assert SVM_grading.main(args) == 2
    assert "--C" in one_error_line(capsys)
    assert not (rhlv_folder / "S" / "metrics.json").exists()


def test_svm_coronal_error_names_the_csv_it_read(rhlv_folder, capsys):
    """With --features coronal the table comes from --rhlv-folder-coronal; an error about it
    named the sagittal rhlv.csv, which was fine, instead of the coronal one."""
    write_rhlv(rhlv_folder / "QC", np.zeros((12, 3)), [0] * 12, ["train"] * 6 + ["test"] * 6)  # one class
    args = ["--rhlv-folder", str(rhlv_folder / "Q"), "--rhlv-folder-coronal", str(rhlv_folder / "QC")]
    args += ["--output-folder", str(rhlv_folder / "S"), "--features", "coronal"]
    assert SVM_grading.main(args) == 2
    line = one_error_line(capsys)
    assert str(rhlv_folder / "QC" / "rhlv.csv") in line and "one class" in line

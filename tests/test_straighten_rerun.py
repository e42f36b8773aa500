"""Reruns of the straightening: a finished patient is kept only for the options it was made with."""

import json
import shutil

import pytest

from data.label_schemes import parse_levels
from straighten import straighten_mask_3d
from straighten.patient import StraightenOptions, is_done, run_patient

PID = "phantom000"
ARGS = ["--labels_only", "--spacing_mm", "2", "--crop_mm", "64", "64", "32"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One small phantom patient, straightened with ``ARGS``."""
    from data.phantom import generate_patient

    root = tmp_path_factory.mktemp("rerun")
    generate_patient(root, 0, 3, parse_levels("T12-L2"), 2.0, 0.0)
    shutil.rmtree(root / "straightened", ignore_errors=True)
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 0
    return root


@pytest.fixture
def root(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "d")
    return tmp_path / "d"


def stamps(root):
    return {p.name: p.stat().st_mtime_ns for p in (root / "straightened").rglob("*.*")}


def curve(root):
    return root / "straightened" / "curve" / f"{PID}.json"


def test_the_curve_json_records_the_options(root):
    options = json.loads(curve(root).read_text())["options"]
    assert options == {
        "spacing_mm": 2.0,
        "crop_mm": [64.0, 64.0, 32.0],
        "window_hu": [-300.0, 800.0],
        "label_scheme": "verse",
        "label_resampling": "distance",
        "crop_ap": "anatomy",
        "smoothing_mm": 1.0,
    }


@pytest.mark.parametrize(
    "change, said",
    [
        (["--spacing_mm", "4"], "--spacing_mm 2, this run 4"),
        (["--crop_mm", "64", "64", "48"], "--crop_mm 64 64 32, this run 64 64 48"),
        (["--window", "-200", "600"], "--window -300 800, this run -200 600"),
        (["--label_scheme", "totalseg"], "--label_scheme verse, this run totalseg"),
        (["--crop_ap", "scanner"], "--crop_ap anatomy, this run scanner"),
        (["--label_resampling", "nearest"], "--label_resampling distance, this run nearest"),
        (["--smoothing_mm", "3"], "--smoothing_mm 1, this run 3"),
    ],
)
def test_a_rerun_with_other_options_is_refused_and_keeps_the_crops(root, capsys, change, said):
    before = stamps(root)
    capsys.readouterr()
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS, *change]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [x for x in err if "straighten:" not in x]  # the progress bar, if any
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "made with other options" in err[0] and said in err[0] and "--overwrite" in err[0], err
    assert f"{PID}.json" in err[0]
    assert stamps(root) == before


def test_the_same_options_skip_and_overwrite_redoes_with_the_new_ones(root, capsys):
    before = stamps(root)
    capsys.readouterr()
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 0
    out, err = capsys.readouterr()
    assert "1 already done" in out and "error" not in err and "warning" not in err
    assert stamps(root) == before
    assert (
        straighten_mask_3d.main(["--dataroot", str(root), *ARGS, "--crop_ap", "scanner", "--overwrite"]) == 0
    )
    record = json.loads(curve(root).read_text())
    assert record["options"]["crop_ap"] == "scanner"
    assert all(c["ap_from"] == "scanner" for c in record["crops"].values())
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS, "--crop_ap", "scanner"]) == 0


def test_the_library_keeps_a_patient_made_with_other_options(root):
    before = stamps(root)
    made = StraightenOptions(spacing_mm=2.0, crop_mm=(64.0, 64.0, 32.0), labels_only=True)
    other = StraightenOptions(
        spacing_mm=2.0, crop_mm=(64.0, 64.0, 32.0), labels_only=True, window=(-200.0, 600.0)
    )
    assert is_done(root, PID, True) and is_done(root, PID, True, made)
    assert not is_done(root, PID, True, other)
    result, error = run_patient(str(root), PID, other)
    assert result is None and "made with other options" in error and "--window" in error
    assert stamps(root) == before


def test_a_curve_json_from_before_the_record_is_read_with_what_it_says(root, capsys):
    """Older curve jsons have no "options" (and, before --crop_ap, no "crop_ap": the scanner's
    frame): what they do say is checked, the rest is named as unknown."""
    record = json.loads(curve(root).read_text())
    del record["options"]
    curve(root).write_text(json.dumps(record))
    before = stamps(root)
    capsys.readouterr()
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 0
    out, err = capsys.readouterr()
    assert "1 already done" in out and stamps(root) == before
    warning = [x for x in err.splitlines() if x.startswith("warning: ")]
    assert len(warning) == 1, err
    assert "unknown" in warning[0] and "--label_scheme" in warning[0] and "--spacing_mm" not in warning[0]
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS, "--spacing_mm", "1"]) == 2
    assert "--spacing_mm 2, this run 1" in capsys.readouterr().err
    del record["crop_ap"]  # made before --crop_ap: the scanner's posterior
    curve(root).write_text(json.dumps(record))
    before = stamps(root)
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 2
    assert "--crop_ap scanner, this run anatomy" in capsys.readouterr().err
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS, "--crop_ap", "scanner"]) == 0
    assert stamps(root) == before


def set_complete(root, vid, complete, reason=""):
    path = root / "raw" / PID / f"{PID}.json"
    entries = json.loads(path.read_text())
    for e in entries:
        if e.get("label") == vid:
            e["complete"] = complete
            if reason:
                e["reason"] = reason
            else:
                e.pop("reason", None)
    path.write_text(json.dumps(entries))


def test_a_patient_whose_inputs_changed_is_straightened_again(root, capsys, caplog):
    """The centroid step run again with other thresholds (L2 now cut): the old L2 crop is not kept
    as if nothing had happened; a copy with new file times but the same contents is still done."""
    label = root / "straightened" / "label" / f"{PID}_21.nii.gz"
    assert label.is_file() and sorted(json.loads(curve(root).read_text())["inputs"]) == ["centroids", "mask"]
    for p in (root / "raw" / PID).iterdir():  # the same contents, other times (a plain copy)
        p.touch()
    before = stamps(root)
    capsys.readouterr()
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 0
    out, err = capsys.readouterr()
    assert "1 already done" in out and "straightened again" not in caplog.text and stamps(root) == before
    set_complete(root, 21, False, "cut by the scan's caudal edge")
    assert not is_done(root, PID, True)
    caplog.clear()
    assert straighten_mask_3d.main(["--dataroot", str(root), *ARGS]) == 0
    out, err = capsys.readouterr()
    said = [r.getMessage() for r in caplog.records if "straightened again" in r.getMessage()]
    assert said == [f"{PID}: {PID}.json changed since it was straightened: straightened again"], said
    assert "1 already done" not in out and not label.exists()
    record = json.loads(curve(root).read_text())
    assert "21" in record["not_measurable"] and "21" not in record["crops"]
    assert is_done(root, PID, True)


def test_a_curve_json_from_before_inputs_were_recorded_is_still_done(root):
    record = json.loads(curve(root).read_text())
    del record["inputs"]
    curve(root).write_text(json.dumps(record))
    set_complete(root, 21, False, "cut by the scan's caudal edge")
    assert is_done(root, PID, True)


def test_lines_logged_while_a_patient_is_straightened_name_it(root, monkeypatch, caplog):
    """Modules that do not know the patient (islands left out of a label, a vertebra without a
    body) log through run_patient, which names it; workers interleave patients."""
    import logging

    from straighten import patient as patient_mod

    def straighten(root_, pid, opt, skip_done=True):
        logging.getLogger("straighten.centroids").warning("label 17 (T10): 1 island(s) apart")
        logging.getLogger("straighten.depedicle").warning("%s: already named", pid)
        return patient_mod.PatientResult(pid, [20])

    monkeypatch.setattr(patient_mod, "straighten_patient", straighten)
    monkeypatch.setattr(patient_mod, "remove_stale_crops", lambda *a, **k: None)
    opt = StraightenOptions(spacing_mm=2.0, crop_mm=(64.0, 64.0, 32.0), labels_only=True, overwrite=True)
    run_patient(str(root), PID, opt)
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{PID}: label 17 (T10): 1 island(s) apart", f"{PID}: already named"], said
    logging.getLogger("straighten.centroids").warning("after")
    assert caplog.records[-1].getMessage() == "after"

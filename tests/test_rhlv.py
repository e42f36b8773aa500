"""RHLV: known shapes, the neighbour baseline, the CLI on tiny crops, a real fractured scan."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from data.nifti_io import save_nifti
from evaluation import RHLV_quantification
from evaluation.rhlv import (
    RHLV_COLUMNS,
    design_heights,
    looks_deformed,
    neighbour_estimate,
    neighbour_note,
    over_common_regions,
    paired_heights,
    rhlv,
    rhlv_missing,
    rhlv_row,
    synthesis_problem,
)
from tests.conftest import shared

# Bodies of anatomical proportions (36 mm deep, 40 mm wide): the rim rule looks 4 mm in from each
# wall, so a body only 12 mm deep would read its whole anterior third as a bevelled rim.
SHAPE = (48, 48, 48)  # height, AP, LR
SPACING = (1.0, 1.0, 1.0)


def body(
    shape=SHAPE, rows=(16, 32), ap=(6, 42), lr=(4, 44), anterior_loss: float = 0.0, row_shift: int = 0
) -> np.ndarray:
    """A box body; ``anterior_loss`` lowers the superior endplate of the anterior third by that share,
    ramps it back to nothing over the middle third, and leaves the posterior third whole."""
    mask = np.zeros(shape, bool)
    h = rows[1] - rows[0]
    for j in range(*ap):
        t = (j - ap[0] + 0.5) / (ap[1] - ap[0])
        loss = anterior_loss if t < 1 / 3 else anterior_loss * max(0.0, (2 / 3 - t) * 3) if t < 2 / 3 else 0.0
        top = rows[0] + int(round(loss * h)) + row_shift
        mask[top : rows[1] + row_shift, j, lr[0] : lr[1]] = True
    return mask


@pytest.mark.parametrize("definition", ["design", "reference"])
def test_unchanged_box_has_no_height_loss(definition):
    box = body()
    h_syn, h_ori = paired_heights(box, box, SPACING, definition)
    np.testing.assert_allclose(h_ori[1:], 16.0)
    np.testing.assert_allclose(rhlv(h_syn, h_ori), 0.0, atol=1e-12)


@pytest.mark.parametrize("definition", ["design", "reference"])
def test_anterior_wedge_of_25_percent(definition):
    healthy, wedge = body(), body(anterior_loss=0.25)
    loss = rhlv(*paired_heights(healthy, wedge, SPACING, definition))
    assert loss[1] == pytest.approx(0.25, abs=0.03)  # anterior
    assert 0.02 < loss[2] < 0.2  # middle: part of the ramp
    assert loss[3] == pytest.approx(0.0, abs=0.02)  # posterior


def columns_mask(heights: dict[int, int], lr=(2, 10), shape=(32, 16, 12)) -> np.ndarray:
    """A body whose AP column j holds ``heights[j]`` voxels (rows ending at the bottom), the same on
    every sagittal slice in ``lr``."""
    mask = np.zeros(shape, bool)
    for j, h in heights.items():
        mask[shape[0] - h :, j, lr[0] : lr[1]] = True
    return mask


def test_reference_heights_of_a_hand_built_wedge():
    """Known answer by REFERENCE.md section 8, worked by hand (every sagittal slice is the same).

    Synthesis: AP columns 2..12, heights 15, 18, 18, then 20. Its extent 2..12 (range 10) gives the
    integer cuts int(2 + 10/3) = 5 and int(2 + 20/3) = 8: anterior columns [0, 5), middle [5, 8),
    posterior [8, end). Its centre column int(1516 / 211) = 7 has height 20.
    Original: a wedge with a 2-voxel spur in front; heights 2, 2, 13, 15, 16, 17, 18, 19, 22, then
    24 (columns 0..12). Its count-weighted centre column int(1647 / 220) = 7 has height 19, so it keeps
    columns taller than 0.7 x 19 = 13.3 (the mean of its distinct columns, 6, would give 18 and keep 13).
    Scaling: the original's maximum 24 exceeds the synthesis' 20, so the whole slice and the
    posterior third scale by r = 24 / (20 + 1e-6); the anterior (16 < 18) and middle (19 < 20) thirds
    do not. The synthesised centre height 20 r is used for every region: threshold 14 r ~ 16.8, which
    drops the anterior 15 (a threshold of 0.7 x 20 = 14 would keep it).
    """
    syn = columns_mask({2: 15, 3: 18, 4: 18} | dict.fromkeys(range(5, 13), 20))
    ori = columns_mask(
        {0: 2, 1: 2, 2: 13, 3: 15, 4: 16, 5: 17, 6: 18, 7: 19, 8: 22} | dict.fromkeys(range(9, 13), 24)
    )
    r = 24 / (20 + 1e-6)
    h_syn, h_ori = paired_heights(syn, ori, SPACING, "reference")
    # all: the 11 scaled columns; anterior 18, 18; middle 20 x 3; posterior 20 r x 5
    assert h_syn == pytest.approx([211 * r / 11, 18.0, 20.0, 20 * r], rel=1e-12)
    # all: 15..19, 22, 24 x 4; anterior 15, 16; middle 17, 18, 19; posterior 22, 24 x 4
    assert h_ori == pytest.approx([203 / 10, 31 / 2, 18.0, 118 / 5], rel=1e-12)
    # spacing scales the counts along axis 0 only
    h_syn2, h_ori2 = paired_heights(syn, ori, (2.0, 1.0, 1.0), "reference")
    assert h_syn2 == pytest.approx(2 * h_syn) and h_ori2 == pytest.approx(2 * h_ori)


def test_reference_slices_centre_on_the_mean_voxel_index():
    """The original occupies LR slices 0..10: slices 0..3 hold a box 10 rows tall (80 voxels each),
    slices 4..10 one 4 rows tall (32 each). The mean LR voxel index is int(2048 / 544) = 3 and
    L = 10 // 5 = 2, so slices 1..4 are measured: (10 + 10 + 10 + 4) / 4 = 8.5 mm in every region.
    (Centred on the extent's midpoint 5, slices 3..6 would give 5.5.)"""
    mask = np.zeros((16, 12, 12), bool)
    mask[6:16, 2:10, 0:4] = True
    mask[12:16, 2:10, 4:11] = True
    h_syn, h_ori = paired_heights(mask, mask, SPACING, "reference")
    assert h_ori == pytest.approx([8.5] * 4) and h_syn == pytest.approx([8.5] * 4)


def test_heights_follow_the_voxel_size():
    box = body()
    assert design_heights(box, (2.0, 1.0, 1.0))[1:] == pytest.approx([32.0] * 3)
    assert np.isnan(design_heights(np.zeros(SHAPE, bool), SPACING)).all()


def test_rhlv_is_nan_without_a_healthy_height():
    out = rhlv(np.array([20.0, 0.0, np.nan]), np.array([15.0, 10.0, 10.0]))
    assert out[0] == pytest.approx(0.25) and np.isnan(out[1:]).all()


def test_neighbour_estimate_leaves_out_a_deformed_neighbour():
    upper = np.array([20.0, 20.0, 20.0, 20.0])
    lower = np.array([24.0, 24.0, 24.0, 24.0])
    fractured = np.array([15.0, 10.0, 15.0, 20.0])
    est, used = neighbour_estimate([upper, lower])
    assert used == [0, 1] and est == pytest.approx([22.0] * 4)
    assert looks_deformed(fractured) and not looks_deformed(upper)
    est, used = neighbour_estimate([fractured, lower])
    assert used == [1] and est == pytest.approx(lower)
    est, used = neighbour_estimate([fractured])  # the only one: used anyway
    assert used == [0]
    est, used = neighbour_estimate([np.full(4, np.nan)])
    assert used == [] and np.isnan(est).all()


def test_neighbour_note_says_when_the_estimate_is_weaker():
    keys = ["p_19", "p_21"]
    assert neighbour_note(keys, [0, 1], [False, False]) == ""  # two healthy-looking neighbours
    assert neighbour_note(keys, [1], [True, False]) == (
        "healthy estimate from one neighbour (p_21, the other looks deformed)"
    )
    assert neighbour_note(keys, [0, 1], [True, True]) == (
        "healthy estimate from neighbours that look deformed (p_19, p_21)"
    )
    assert neighbour_note(["p_23"], [0], [False]) == "healthy estimate from one neighbour (p_23)"
    assert neighbour_note(keys, [], [False, False]) == ""  # no estimate: the missing value says it


# --- the CLI on a tiny straightened folder ---------------------------------------------------
AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


def crop_labels(target: int, upper: int | None, lower: int | None, target_body: np.ndarray) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[target_body] = target
    if upper:
        labels[body(rows=(0, 12))] = upper
    if lower:
        labels[body(rows=(36, 48))] = lower
    return labels


@pytest.fixture
def tiny_root(tmp_path):
    """Patient p: T12 (19), T13 (28, a 25 % anterior wedge), L1 (20); L2 (21) absent; L3 (22).

    ``O/label_fake`` holds the crops with T13 restored to a box (a perfect synthesis)."""
    root = tmp_path / "D"
    levels = [19, 28, 20, 22]
    for i, vid in enumerate(levels):
        target = body(anterior_loss=0.25) if vid == 28 else body()
        upper = levels[i - 1] if i else None
        lower = levels[i + 1] if i + 1 < len(levels) else None
        labels = crop_labels(vid, upper, lower, target)
        save_nifti(root / "straightened" / "label" / f"p_{vid}.nii.gz", labels, AFFINE, dtype=np.uint8)
        fake = crop_labels(vid, upper, lower, body())
        save_nifti(tmp_path / "O" / "label_fake" / f"p_{vid}.nii.gz", fake, AFFINE, dtype=np.uint8)
    split = {"train": {"p_19": 0, "p_28": 2}, "val": {}, "test": {"p_20": 0, "p_22": 0}}
    (root / "vertebra_data.json").write_text(json.dumps(split))
    return tmp_path


def read_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == RHLV_COLUMNS
        return {r["vertebra"]: r for r in reader}


@pytest.mark.parametrize("method", ["gan", "neighbors"])
def test_cli_measures_the_wedge(tiny_root, method):
    d = tiny_root / "D"
    args = ["--label-folder", str(d / "straightened" / "label"), "--result-folder", str(tiny_root / "Q")]
    args += ["--json-path", str(d / "vertebra_data.json"), "--method", method]
    if method == "gan":
        args += ["--output-folder", str(tiny_root / "O")]
    assert RHLV_quantification.main(args) == 0
    rows = read_rows(tiny_root / "Q" / "rhlv.csv")
    assert set(rows) == {"p_19", "p_28", "p_20", "p_22"}
    wedge = rows["p_28"]
    assert (wedge["grade"], wedge["split"], wedge["vid"]) == ("2", "train", "28")
    assert float(wedge["rhlv_anterior"]) == pytest.approx(0.25, abs=0.03)
    assert float(wedge["rhlv_posterior"]) == pytest.approx(0.0, abs=0.02)
    assert float(wedge["h_syn_posterior"]) == pytest.approx(16.0)
    healthy = ("p_19", "p_20", "p_22") if method == "gan" else ("p_20", "p_22")  # p_20 leaves out T13
    for key in healthy:
        assert float(rows[key]["rhlv_anterior"]) == pytest.approx(0.0, abs=0.02)
    if method == "neighbors":  # T12's only neighbour is the wedge: the baseline's known weakness
        assert float(rows["p_19"]["rhlv_anterior"]) == pytest.approx(1 - 16 / 12, abs=0.02)
        # ... which the row says, as it says when one side alone gave the estimate
        assert rows["p_19"]["note"] == "healthy estimate from one neighbour, which looks deformed (p_28)"
        assert rows["p_20"]["note"] == "healthy estimate from one neighbour (p_22, the other looks deformed)"
        assert rows["p_22"]["note"] == "healthy estimate from one neighbour (p_20)"
        assert rows["p_28"]["note"] == ""  # T12 and L1, both healthy
        summary = json.loads((tiny_root / "Q" / "summary.json").read_text())
        assert summary["no_rhlv"] == {} and set(summary["notes"]) == {"p_19", "p_20", "p_22"}
    else:
        assert all(r["note"] == "" for r in rows.values())
    assert (tiny_root / "Q" / "maps" / "p_28.png").stat().st_size > 0
    # a rerun skips the finished folder
    stamp = (tiny_root / "Q" / "rhlv.csv").stat().st_mtime_ns
    assert RHLV_quantification.main(args) == 0
    assert (tiny_root / "Q" / "rhlv.csv").stat().st_mtime_ns == stamp


def test_neighbors_steps_over_missing_levels_and_t13(tiny_root):
    d = tiny_root / "D"
    store = RHLV_quantification.open_store(str(d / "straightened" / "label"))
    m = RHLV_quantification.Measurer(store, "design")
    assert m.neighbour_keys(store.load("p_28")) == ["p_19", "p_20"]  # T12 above T13, L1 below
    assert m.neighbour_keys(store.load("p_22")) == ["p_20"]  # L2 is missing: L1 above, nothing below


def test_cli_bad_inputs_give_one_line(tiny_root, capsys):
    d = tiny_root / "D"
    label = str(d / "straightened" / "label")
    q = str(tiny_root / "Qbad")
    assert RHLV_quantification.main(["--label-folder", str(tiny_root / "nope"), "--result-folder", q]) == 2
    assert RHLV_quantification.main(["--label-folder", label, "--result-folder", q, "--method", "gan"]) == 2
    (tiny_root / "empty.json").write_text(json.dumps({"train": {}, "val": {}, "test": {}}))
    args = ["--label-folder", label, "--result-folder", q, "--method", "neighbors"]
    assert RHLV_quantification.main([*args, "--json-path", str(tiny_root / "empty.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert not (tiny_root / "Qbad" / "rhlv.csv").exists()


def test_cli_rejects_a_synthesis_on_another_grid(tiny_root, capsys):
    fake = tiny_root / "O" / "label_fake" / "p_19.nii.gz"
    save_nifti(fake, np.zeros((10, 10, 10), np.uint8), AFFINE, dtype=np.uint8)
    d = tiny_root / "D"
    args = ["--label-folder", str(d / "straightened" / "label"), "--result-folder", str(tiny_root / "Q")]
    args += ["--output-folder", str(tiny_root / "O"), "--json-path", str(d / "vertebra_data.json")]
    assert RHLV_quantification.main(args) == 2
    assert "differs from its crop" in capsys.readouterr().err


def test_cli_failure_writes_nothing_and_the_rerun_draws_every_map(tiny_root, capsys):
    """The last vertebra's synthesis is on another grid: the run fails before writing any map or
    the csv. Once it is fixed, a rerun without --overwrite draws every map, replacing a leftover
    map of an unfinished folder, so no map can disagree with rhlv.csv."""
    fake = tiny_root / "O" / "label_fake" / "p_22.nii.gz"
    good = fake.read_bytes()
    save_nifti(fake, np.zeros((10, 10, 10), np.uint8), AFFINE, dtype=np.uint8)
    d, q = tiny_root / "D", tiny_root / "Q"
    args = ["--label-folder", str(d / "straightened" / "label"), "--result-folder", str(q)]
    args += ["--output-folder", str(tiny_root / "O"), "--json-path", str(d / "vertebra_data.json")]
    assert RHLV_quantification.main(args) == 2
    assert "p_22.nii.gz" in capsys.readouterr().err
    assert not q.exists() or not any(q.rglob("*"))  # no maps, no csv, no summary
    fake.write_bytes(good)
    stale = q / "maps" / "p_19.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"a map of an earlier, unfinished run")
    assert RHLV_quantification.main(args) == 0
    assert read_rows(q / "rhlv.csv").keys() == {"p_19", "p_28", "p_20", "p_22"}
    for key in ("p_19", "p_28", "p_20", "p_22"):
        assert (q / "maps" / f"{key}.png").read_bytes().startswith(b"\x89PNG"), key


def test_synthesis_problem_known_answers():
    ori = np.zeros((10, 10, 10), bool)
    ori[2:8, 2:8, 2:8] = True  # 216 voxels
    assert synthesis_problem(ori, ori) == ""
    assert synthesis_problem(np.zeros_like(ori), ori) == "no synthesised vertebra"
    half = ori.copy()
    half[2:5] = False  # 108 voxels: exactly half is still accepted
    assert synthesis_problem(half, ori) == ""
    sliver = np.zeros_like(ori)
    sliver[5, 5, 5] = True
    assert synthesis_problem(sliver, ori) == (
        "implausible synthesis: 0.46 % of the original's volume (under 50 %)"
    )
    bigger = np.ones_like(ori)  # a healthy twin may be larger than a fractured original
    assert synthesis_problem(bigger, ori) == ""


def test_rows_say_why_a_value_is_missing():
    h_ori = np.array([20.0, 20.0, 20.0, 20.0])
    whole = rhlv_row("p_20", "p", 20, 0, "test", np.array([25.0, 25.0, 25.0, 25.0]), h_ori)
    assert whole["note"] == "" and whole["rhlv_anterior"] == 0.2
    # a region the height definition could not measure
    part = rhlv_row("p_20", "p", 20, 0, "test", np.array([25.0, np.nan, 25.0, 25.0]), h_ori)
    assert part["note"] == "height not measurable: anterior" and part["rhlv_anterior"] == ""
    # a reason given by the caller wins
    given = rhlv_row("p_20", "p", 20, 0, "test", np.full(4, np.nan), h_ori, "no synthesised vertebra")
    assert given["note"] == "no synthesised vertebra"
    # a remark joins the reason, whichever there is
    h_syn = np.array([25.0, np.nan, 25.0, 25.0])
    both = rhlv_row(
        "p_20", "p", 20, 0, "test", h_syn, h_ori, remark="healthy estimate from one neighbour (p_21)"
    )
    assert both["note"] == "height not measurable: anterior; healthy estimate from one neighbour (p_21)"
    assert rhlv_missing(both) and not rhlv_missing(whole)


@pytest.mark.parametrize(
    ("h_syn", "grade"),
    [
        ([20.0, 20.0, 20.0], 0),  # no loss
        ([24.0, 20.0, 20.0], 0),  # 16.7 % anterior
        ([20.0, 20.0, 26.0], 1),  # 23.1 % posterior: mild
        ([30.0, 20.0, 20.0], 2),  # 33.3 %: moderate
        ([40.0, 30.0, 20.0], 3),  # 50 % anterior: severe, whatever the other regions
        ([15.0, 15.0, 15.0], 0),  # taller than its twin: no loss, grade 0
        ([np.nan, 30.0, 20.0], 2),  # the measured regions decide
        ([np.nan, np.nan, np.nan], ""),  # nothing measured: no grade
    ],
)
def test_genant_grade_from_the_largest_regional_rhlv(h_syn, grade):
    h_ori = np.array([20.0, 20.0, 20.0, 20.0])
    row = rhlv_row("p_20", "p", 20, None, None, np.array([np.mean(h_syn), *h_syn]), h_ori)
    assert row["genant_from_rhlv"] == grade


def test_cli_a_sliver_of_synthesis_gives_no_rhlv(tiny_root, caplog):
    """A synthesis holding a few voxels of the target (a run on scans unlike its training data)
    would give a height of a voxel or two and an RHLV of -1000 %: it gets none, and says why."""
    fake = tiny_root / "O" / "label_fake" / "p_20.nii.gz"
    img = nib.load(fake)
    labels = np.asarray(img.dataobj).copy()
    target = np.argwhere(labels == 20)
    labels[labels == 20] = 0
    labels[tuple(target[len(target) // 2])] = 20  # one voxel left
    save_nifti(fake, labels, AFFINE, dtype=np.uint8)
    d, q = tiny_root / "D", tiny_root / "Q"
    args = ["--label-folder", str(d / "straightened" / "label"), "--result-folder", str(q), "--no-maps"]
    args += ["--output-folder", str(tiny_root / "O"), "--json-path", str(d / "vertebra_data.json")]
    with caplog.at_level("WARNING"):
        assert RHLV_quantification.main(args) == 0
    rows = read_rows(q / "rhlv.csv")
    sliver = rows["p_20"]
    assert sliver["note"].startswith("implausible synthesis: ")
    assert all(sliver[f"rhlv_{r}"] == "" for r in ("all", "anterior", "middle", "posterior"))
    assert all(sliver[f"h_syn_{r}"] == "" for r in ("anterior", "middle", "posterior"))
    assert float(sliver["h_ori_middle"]) > 0  # the original is still measured
    assert all(rows[k]["note"] == "" for k in ("p_19", "p_28", "p_22"))
    summary = json.loads((q / "summary.json").read_text())
    assert list(summary["no_rhlv"]) == ["p_20"]
    assert any("p_20" in r.getMessage() and "no RHLV" in r.getMessage() for r in caplog.records)


def test_cli_no_maps_draws_none(tiny_root):
    d, q = tiny_root / "D", tiny_root / "Q"
    args = ["--label-folder", str(d / "straightened" / "label"), "--result-folder", str(q), "--no-maps"]
    args += ["--output-folder", str(tiny_root / "O"), "--json-path", str(d / "vertebra_data.json")]
    assert RHLV_quantification.main(args) == 0
    assert (q / "rhlv.csv").exists() and not (q / "maps").exists()


@pytest.mark.slow
def test_neighbors_on_a_real_fractured_scan_without_ct(tmp_path):
    """sub-verse004 (VerSe19, mask only): T9 and T10 grade 2, L1 grade 3, the others 0."""
    from straighten import location_json_local, straighten_mask_3d

    raw = tmp_path / "raw" / "sub-verse004"
    raw.mkdir(parents=True)
    shutil.copy(shared("masks/sub-verse004_vert_msk.nii.gz"), raw / "sub-verse004_msk.nii.gz")
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 0
    crop = ["--crop_mm", "128", "96", "64"]  # room for the target and its neighbours; a quarter of the work
    assert straighten_mask_3d.main(["--dataroot", str(tmp_path), "--labels_only", *crop]) == 0
    split = shared("splits/verse_genant_grades.json")
    q = tmp_path / "Q"
    args = ["--label-folder", str(tmp_path / "straightened" / "label"), "--result-folder", str(q)]
    assert (
        RHLV_quantification.main([*args, "--json-path", str(split), "--method", "neighbors", "--no-maps"])
        == 0
    )
    rows = read_rows(q / "rhlv.csv")
    assert {r["pid"] for r in rows.values()} == {"sub-verse004"}
    regions = ("anterior", "middle", "posterior")
    worst = {k: max(float(r[f"rhlv_{g}"]) for g in regions) for k, r in rows.items()}
    fractured = [k for k, r in rows.items() if r["grade"] in ("2", "3")]
    normal = [k for k, r in rows.items() if r["grade"] == "0"]
    assert fractured and normal
    # every fractured vertebra shows more height loss than every normal one
    assert min(worst[k] for k in fractured) > max(worst[k] for k in normal), worst
    assert float(rows["sub-verse004_20"]["rhlv_anterior"]) > 0.4  # L1, grade 3


def test_rhlv_all_compares_the_regions_measured_on_both_sides():
    # the original's anterior third is not measurable: both means leave it out
    h_syn, h_ori = over_common_regions(np.array([0.0, 30.0, 20.0, 20.0]), np.array([0.0, np.nan, 16.0, 16.0]))
    assert h_syn[0] == 20.0 and h_ori[0] == 16.0
    row = rhlv_row("p_20", "p", 20, 0, "test", h_syn, h_ori)
    assert row["rhlv_all"] == 0.2 and row["rhlv_anterior"] == ""  # was (70/3 - 16) / (70/3) = 0.314
    # every region on both sides: the mean of all three, as the DESIGN definition has it
    whole = over_common_regions(np.array([0.0, 30.0, 20.0, 10.0]), np.array([0.0, 24.0, 16.0, 8.0]))
    assert whole[0][0] == 20.0 and whole[1][0] == 16.0
    # nothing measured on one side: no mean
    none = over_common_regions(np.full(4, np.nan), np.array([16.0, 16.0, 16.0, 16.0]))
    assert np.isnan(none[0][0]) and np.isnan(none[1][0])

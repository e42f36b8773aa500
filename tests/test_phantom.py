"""The phantom's outputs agree with its own ground truth."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from data import phantom
from data.label_schemes import is_vertebra
from data.nifti_io import load_ct, load_mask, sample_world
from data.phantom import CSV_COLUMNS, generate, main
from evaluation.heights import BodyHeights, body_heights, genant_from_heights
from straighten.centroids import label_centroids, read_centroids
from util.errors import InputError


def truth_rows(root):
    with open(root / "truth" / "vertebrae.csv") as f:
        return list(csv.DictReader(f))


def heights_of(row, prefix):
    return BodyHeights(*(float(row[f"{prefix}_{r}_mm"]) for r in ("anterior", "middle", "posterior")))


def local_body(mask, geometry_vertebra, vid, step):
    """The body mask resampled (nearest) into the vertebra's own frame."""
    g = geometry_vertebra
    half = np.array([g["body_height_mm"] / 2 + 6, g["body_depth_mm"] / 2 + 6, g["body_width_mm"] / 2 + 6])
    axes = np.array([g["axes"]["height"], g["axes"]["ap"], g["axes"]["lr"]])
    h, a, r = (np.arange(-e, e + step / 2, step) for e in half)
    pts = (
        np.array(g["centre_mm"])
        + h[:, None, None, None] * axes[0]
        + a[None, :, None, None] * axes[1]
        + r[None, None, :, None] * axes[2]
    )
    return sample_world(mask.array, mask.affine, pts, order=0) == vid


def test_layout_and_csv(phantom_2mm):
    rows = truth_rows(phantom_2mm)
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    pids = sorted({r["pid"] for r in rows})
    assert len(pids) == 3
    for pid in pids:
        for rel in (
            f"raw/{pid}/{pid}.nii.gz",
            f"raw/{pid}/{pid}_msk.nii.gz",
            f"raw/{pid}/{pid}.json",
            f"truth/{pid}/{pid}_healthy.nii.gz",
            f"truth/{pid}/{pid}_healthy_msk.nii.gz",
            f"truth/{pid}/{pid}_body_msk.nii.gz",
            f"truth/{pid}/{pid}_geometry.json",
        ):
            assert (phantom_2mm / rel).is_file(), rel
    split = json.loads((phantom_2mm / "vertebra_data.json").read_text())
    assert set(split) == {"train", "val", "test"}
    members = [{k.rsplit("_", 1)[0] for k in split[s]} for s in ("train", "val", "test")]
    assert all(members) and not (
        members[0] & members[1] or members[0] & members[2] or members[1] & members[2]
    )
    assert sum(len(v) for v in split.values()) == len(rows) == 3 * 8
    assert {r["fracture_type"] for r in rows if r["grade"] != "0"} <= {"wedge", "biconcave", "crush"}


def test_looks_like_ct(phantom_2mm):
    ct = load_ct(phantom_2mm / "raw/phantom000/phantom000.nii.gz")
    mask = load_mask(phantom_2mm / "raw/phantom000/phantom000_msk.nii.gz")
    assert ct.array.min() < -950  # air outside the body
    body = load_mask(phantom_2mm / "truth/phantom000/phantom000_body_msk.nii.gz")
    bone = ct.array[body.array > 0]
    assert 100 < np.median(bone) < 500  # cancellous bone
    assert np.percentile(bone, 99) > 600  # cortical shell
    soft = ct.array[(mask.array == 0) & (ct.array > -200) & (ct.array < 200)]
    assert soft.size > 0.2 * ct.array.size
    # posterior elements carry the vertebra's label: labels reach far behind the bodies
    assert (mask.array > 0).sum() > 1.5 * (body.array > 0).sum()


def test_centroid_json_matches_label_centroids(phantom_2mm):
    for pid in ("phantom000", "phantom001", "phantom002"):
        mask = load_mask(phantom_2mm / f"raw/{pid}/{pid}_msk.nii.gz")
        listed = read_centroids(phantom_2mm / f"raw/{pid}/{pid}.json")
        actual = label_centroids(mask.array, list(listed))
        assert set(listed) >= set(range(17, 25))
        for vid, c in listed.items():
            assert np.all(np.abs(c - actual[vid]) <= 1.0), (pid, vid)


def test_heights_from_masks_match_truth_within_a_voxel(phantom_2mm):
    spacing = 2.0
    errors = []
    for row in truth_rows(phantom_2mm):
        pid, vid = row["pid"], int(row["vid"])
        geo = json.loads((phantom_2mm / f"truth/{pid}/{pid}_geometry.json").read_text())
        g = next(v for v in geo["vertebrae"] if v["vid"] == vid)
        body = load_mask(phantom_2mm / f"truth/{pid}/{pid}_body_msk.nii.gz")
        # measure the raster finely in the vertebra's frame, so resampling adds little to its rounding
        local = local_body(body, g, vid, spacing / 4)
        measured = body_heights(local, spacing / 4).as_array()
        errors.append(measured - heights_of(row, "fractured").as_array())
    errors = np.abs(np.array(errors))
    assert errors.max() <= spacing, errors.max()


def test_grades_agree_with_truth_heights(phantom_2mm):
    rows = {f"{r['pid']}_{r['vid']}": r for r in truth_rows(phantom_2mm)}
    split = json.loads((phantom_2mm / "vertebra_data.json").read_text())
    graded = {k: g for s in split.values() for k, g in s.items()}
    assert graded.keys() == rows.keys()
    for key, grade in graded.items():
        row = rows[key]
        assert (
            grade
            == int(row["grade"])
            == genant_from_heights(heights_of(row, "healthy"), heights_of(row, "fractured"))
        )
    assert len(set(graded.values())) >= 3  # the fixture has fractures of several grades


def test_healthy_and_fractured_differ_only_at_fractured_vertebrae(phantom_2mm):
    rows = truth_rows(phantom_2mm)
    for pid in ("phantom000", "phantom001", "phantom002"):
        fractured = {int(r["vid"]) for r in rows if r["pid"] == pid and r["grade"] != "0"}
        ct = load_ct(phantom_2mm / f"raw/{pid}/{pid}.nii.gz").array
        healthy = load_ct(phantom_2mm / f"truth/{pid}/{pid}_healthy.nii.gz").array
        mask = load_mask(phantom_2mm / f"raw/{pid}/{pid}_msk.nii.gz").array
        healthy_mask = load_mask(phantom_2mm / f"truth/{pid}/{pid}_healthy_msk.nii.gz").array
        differ = (ct != healthy) | (mask != healthy_mask)
        # a collapsed endplate keeps its full width, so the body may bulge a little past its old waist
        near = ndimage.binary_dilation(np.isin(healthy_mask, list(fractured)), iterations=2)
        others = (healthy_mask > 0) & ~np.isin(healthy_mask, list(fractured))
        assert not (differ & ~near).any(), pid
        assert not (differ & others).any(), pid
        for vid in fractured:
            assert (differ & (healthy_mask == vid)).any(), (pid, vid)
            assert (mask == vid).sum() < (healthy_mask == vid).sum()


def test_partial_end_vertebrae_are_drawn_but_not_graded(phantom_2mm):
    mask = load_mask(phantom_2mm / "raw/phantom000/phantom000_msk.nii.gz").array
    present = {int(v) for v in np.unique(mask) if v}
    assert 16 in present and 26 in present  # T9 above T10, the sacrum below L5
    assert all(is_vertebra(v) for v in present - {26})
    graded = {int(r["vid"]) for r in truth_rows(phantom_2mm) if r["pid"] == "phantom000"}
    assert graded == set(range(17, 25))


def test_same_seed_same_bytes(tmp_path):
    digests = []
    for run in ("a", "b"):
        generate(tmp_path / run, patients=1, seed=3, spacing_mm=3.0, levels="L1-L3", progress=False)
        files = sorted(p for p in (tmp_path / run).rglob("*") if p.is_file())
        digests.append(
            {p.relative_to(tmp_path / run).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in files}
        )
    assert digests[0] == digests[1]
    generate(tmp_path / "c", patients=1, seed=4, spacing_mm=3.0, levels="L1-L3", progress=False)
    other = hashlib.md5((tmp_path / "c/raw/phantom000/phantom000.nii.gz").read_bytes()).hexdigest()
    assert other != digests[0]["raw/phantom000/phantom000.nii.gz"]


def test_worker_processes_give_the_same_bytes(tmp_path):
    for run, workers in (("one", 1), ("two", 2)):
        generate(
            tmp_path / run,
            patients=2,
            seed=9,
            spacing_mm=3.0,
            levels="L2-L4",
            workers=workers,
            progress=False,
        )
    for path in sorted((tmp_path / "one").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "two" / path.relative_to(tmp_path / "one")).read_bytes(), path


def test_cli_refuses_to_overwrite_and_checks_arguments(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--patients", "1", "--spacing_mm", "3", "--levels", "L2-L3"]) == 0
    assert main(["--out", str(tmp_path), "--patients", "1", "--spacing_mm", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--levels", "C1-C2"]) == 2
    assert main(["--out", str(tmp_path / "y"), "--patients", "0"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "extra, said",
    [
        (["--quirks", "--bevel_mm", "2"], "it would ignore --bevel_mm"),
        (["--quirks", "--tilt_deg", "1", "--truncate", "cranial"], "it would ignore --truncate --tilt_deg"),
        (["--bevel_mm", "nan"], "--bevel_mm must be a finite number"),
        (["--slice_mm", "nan"], "--slice_mm must be a finite number"),
    ],
)
def test_quirk_flags_that_would_be_ignored_are_refused(tmp_path, capsys, extra, said):
    """--quirks sets the truncation, bevel and tilt itself: values given beside it were dropped
    silently, and a NaN passed every range check and turned its quirk off."""
    assert main(["--out", str(tmp_path / "q"), "--patients", "1", "--spacing_mm", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_fracture_fraction_extremes(tmp_path, fraction):
    rows = generate(
        tmp_path,
        patients=1,
        seed=5,
        spacing_mm=3.0,
        levels="T12-L3",
        fracture_fraction=fraction,
        progress=False,
    )
    grades = [r["grade"] for r in rows]
    assert (max(grades) == 0) if fraction == 0 else (min(grades) > 0 or sum(g > 0 for g in grades) >= 3)


@pytest.mark.slow
def test_quirks_have_truth_and_the_cut_vertebrae_are_flagged(tmp_path):
    """Every quirk on (2 mm, 4 mm slices): the cranial and caudal cuts go through the first and
    last full bodies, the centroid json flags exactly those, thick slices are in the affine."""
    from data.phantom import Quirks
    from straighten.centroids import read_completeness

    rows = generate(tmp_path, 1, 4, 2.0, fracture_fraction=0.0, progress=False, quirks=Quirks.all_on(4.0))
    cut = {r["vid"]: r["reason"] for r in rows if not r["complete"]}
    assert set(cut) == {17, 24} and "cranial" in cut[17] and "caudal" in cut[24]
    states = read_completeness(tmp_path / "raw/phantom000/phantom000.json")
    assert {v for v, s in states.items() if not s.complete and v in range(17, 25)} == {17, 24}
    mask = load_mask(tmp_path / "raw/phantom000/phantom000_msk.nii.gz")
    np.testing.assert_allclose(mask.spacing, [2.0, 2.0, 4.0])
    assert mask.shape[0] * 2.0 <= 82.0  # the lateral field of view of 80 mm
    graded = json.loads((tmp_path / "vertebra_data.json").read_text())
    keys = {k for split in graded.values() for k in split}
    assert "phantom000_17" not in keys and "phantom000_20" in keys
    geo = json.loads((tmp_path / "truth/phantom000/phantom000_geometry.json").read_text())
    tilts = [g["tilt_to_curve_deg"] for g in geo["vertebrae"] if g["vid"] != 26]
    assert max(abs(t) for t in tilts) <= 6.0 and len({round(t, 3) for t in tilts}) > 3
    assert all(3.0 <= g["bevel_mm"] <= 5.0 for g in geo["vertebrae"] if g["vid"] != 26)


def test_bevelled_rim_leaves_the_truth_heights_alone():
    """The rim rule: the truth of a bevelled body is that of the same body without the bevel."""
    from data.phantom import truth_heights
    from data.phantom_anatomy import VertebraShape
    from evaluation.heights import heights_from_columns

    plain = VertebraShape(vid=20, centre=np.zeros(3), axes=np.eye(3), H=25.0, A=16.0, W=21.0)
    bevelled = VertebraShape(
        vid=20, centre=np.zeros(3), axes=np.eye(3), H=25.0, A=16.0, W=21.0, bevel=6.0, bevel_depth=9.0
    )
    with_rule = truth_heights(bevelled, fractured=False).as_array()
    assert with_rule == pytest.approx(truth_heights(plain, fractured=False).as_array(), abs=1.0)
    cols = bevelled.column_heights(0.25, fractured=False)
    without = heights_from_columns(cols, ap_spacing_mm=0.25, exclude_rim=False)
    assert without.anterior < with_rule[0] - 1.0


def test_oblique_grid_turns_the_affine_and_keeps_every_label_in_place():
    """The oblique-affine quirk: the grid turns, the anatomy stays where it was in the world."""
    from data.nifti_io import voxel_to_world
    from data.phantom import oblique_grid
    from data.phantom_anatomy import rotation

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -20.0, -40.0]
    mask = np.zeros((30, 24, 40), np.uint8)
    mask[8:20, 6:16, 10:22] = 20
    mask[8:20, 6:16, 26:36] = 21
    vols = {"ct": np.where(mask > 0, 500, 40).astype(np.int16), "mask": mask, "body": mask.copy()}
    out, aff = oblique_grid(vols, affine, (5.0, -4.0))
    np.testing.assert_allclose(aff[:3, :3], rotation(5.0, -4.0) @ affine[:3, :3], atol=1e-9)
    assert not np.allclose(aff[:3, :3], np.diag(np.diag(aff[:3, :3])))  # oblique
    assert out["ct"].dtype == np.int16 and out["ct"].min() == -1024  # air where the scan was not
    for vid in (20, 21):
        before = voxel_to_world(affine, np.argwhere(mask == vid)).mean(axis=0)
        after = voxel_to_world(aff, np.argwhere(out["mask"] == vid)).mean(axis=0)
        np.testing.assert_allclose(after, before, atol=0.5)
        assert (out["mask"] == vid).sum() == pytest.approx((mask == vid).sum(), rel=0.05)
    np.testing.assert_array_equal(out["body"], out["mask"])


def test_steep_lumbosacral_junction_turns_the_sacrum_not_l5():
    """The steep-L5/S1 quirk adds 70-100 % of its angle between L5 and the sacrum; L5 keeps its truth."""
    from data.label_schemes import SACRUM, parse_levels
    from data.phantom import Quirks, build_patient, truth_heights

    def draw(deg):
        rng, qrng = np.random.default_rng([3, 0]), np.random.default_rng([3, 0, 7])
        p = build_patient(
            "p", rng, parse_levels("L3-L5"), 2.0, 0.0, quirks=Quirks(lumbosacral_deg=deg), quirk_rng=qrng
        )
        by = {s.vid: s for s in p.shapes}
        angle = np.degrees(np.arccos(np.clip(by[24].axes[0] @ by[SACRUM].axes[0], -1, 1)))
        return angle, truth_heights(by[24], fractured=False).as_array()

    flat, l5_flat = draw(0.0)
    steep, l5_steep = draw(20.0)
    assert 14.0 - 1e-6 <= steep - flat <= 20.0 + 1e-6
    np.testing.assert_allclose(l5_steep, l5_flat)


def fake_patients(monkeypatch, written):
    """Replace the rendering with a stub that writes one file per patient (fast)."""

    def fake(out, i, *args):
        pid = f"phantom{i:03d}"
        for folder in ("raw", "truth"):
            (out / folder / pid).mkdir(parents=True, exist_ok=True)
            (out / folder / pid / f"{pid}.txt").write_text("x")
        written.append(pid)
        return []

    monkeypatch.setattr(phantom, "generate_patient", fake)


def test_split_file_is_written_last(tmp_path, monkeypatch):
    fake_patients(monkeypatch, [])
    order = []
    for name in ("write_json", "write_text"):
        real = getattr(phantom, name)

        def record(path, *args, _real=real, **kwargs):
            order.append(Path(path).name)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(phantom, name, record)
    generate(tmp_path, patients=3, seed=0, spacing_mm=3.0, levels="L2-L3", progress=False)
    assert order[-1] == "vertebra_data.json" and "vertebrae.csv" in order


def test_overwrite_with_fewer_patients_keeps_none_of_the_old_ones(tmp_path, monkeypatch):
    written = []
    fake_patients(monkeypatch, written)
    generate(tmp_path, patients=4, seed=0, spacing_mm=3.0, levels="L2-L3", progress=False)
    (tmp_path / "raw" / "notes").mkdir()  # not a phantom patient: left alone
    generate(tmp_path, patients=2, seed=0, spacing_mm=3.0, levels="L2-L3", progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["notes", "phantom000", "phantom001"]
    patients = sorted(p.name for p in (tmp_path / "truth").iterdir() if p.is_dir())
    assert patients == ["phantom000", "phantom001"]
    split = json.loads((tmp_path / "vertebra_data.json").read_text())
    assert set(split) == {"train", "val", "test"}


@pytest.mark.parametrize(
    ("spacing_mm", "seed"), [(float("nan"), 0), (float("inf"), 0), (0.0, 0), (5.0, 0), (2.0, -1)]
)
def test_generate_rejects_bad_spacing_and_seed_before_writing(tmp_path, spacing_mm, seed):
    with pytest.raises(InputError):
        generate(tmp_path / "out", patients=1, seed=seed, spacing_mm=spacing_mm, progress=False)
    assert not (tmp_path / "out").exists()

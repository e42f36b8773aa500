"""Completeness of each vertebra from the geometry: bodies cut by the scan's edge, not posterior
elements cut by a narrow lateral field of view, and the complete/reason records."""

import json

import numpy as np
import pytest

from data.nifti_io import save_nifti
from straighten import location_json_local
from straighten.centroids import (
    Completeness,
    body_cut_by_fov,
    read_centroids,
    read_completeness,
    vertebra_completeness,
    write_centroids,
)

SPACING = 2.0


def mini_spine(n_levels: int = 4, lr_half: int = 16, tp: bool = True) -> np.ndarray:
    """A straight RAS spine of box bodies (2 mm voxels) with a canal, an arch and transverse
    processes reaching ``lr_half`` voxels to each side; VerSe ids 19, 20, ... from the top."""
    level, body_h, disc = 16, 12, 4  # voxels per level: 24 mm body, 8 mm disc
    nz = n_levels * level + 8
    mask = np.zeros((2 * lr_half + 1, 34, nz), np.uint8)
    c = lr_half
    for i in range(n_levels):
        vid = 19 + i
        z1 = nz - 4 - i * level  # top (superior = high z)
        z0 = z1 - body_h
        mask[c - 11 : c + 12, 16:32, z0:z1] = vid  # body, anterior = high y
        mask[c - 8 : c - 4, 9:16, z0 + 6 : z1] = vid  # pedicles beside the canal
        mask[c + 5 : c + 9, 9:16, z0 + 6 : z1] = vid
        mask[c - 8 : c + 9, 5:9, z0 + 4 : z1 + 2] = vid  # lamina behind the canal
        mask[c - 2 : c + 3, 1:5, z0 + 2 : z1] = vid  # spinous process
        if tp:
            mask[:, 6:9, z0 + 6 : z0 + 10][np.abs(np.arange(mask.shape[0]) - c) >= 6] = vid
        assert disc > 0
    return mask


def affine_2mm() -> np.ndarray:
    return np.diag([SPACING, SPACING, SPACING, 1.0])


def test_a_whole_spine_has_nothing_cut_even_with_transverse_processes_at_the_lateral_edge():
    mask = mini_spine()
    assert (mask[0] > 0).any() and (mask[-1] > 0).any()  # processes reach both lateral faces
    assert body_cut_by_fov(mask, affine_2mm()) == {}
    states = vertebra_completeness(mask, affine_2mm(), 0.0, 0.0)
    assert all(s.complete for s in states.values())


@pytest.mark.parametrize("where", ["cranial", "caudal"])
def test_a_body_cut_by_the_first_or_last_slice_is_flagged_with_its_direction(where):
    mask = mini_spine()
    cut = mask[:, :, :-10] if where == "cranial" else mask[:, :, 12:]
    top, bottom = 19, 22
    flagged = body_cut_by_fov(cut, affine_2mm())
    victim = top if where == "cranial" else bottom
    assert set(flagged) == {victim}
    assert where in flagged[victim]


def test_a_body_cut_laterally_is_flagged_but_not_its_neighbours():
    mask = mini_spine()
    narrow = mask[6:-6].copy()  # cuts every body's sides: every vertebra is cut
    assert set(body_cut_by_fov(narrow, affine_2mm())) == {19, 20, 21, 22}
    # a flipped, oblique-free LPS affine finds the same
    lps = np.diag([-SPACING, -SPACING, SPACING, 1.0])
    assert set(body_cut_by_fov(narrow, lps)) == {19, 20, 21, 22}


def test_records_carry_complete_and_reason(tmp_path):
    mask = mini_spine()[:, :, :-10]
    states = vertebra_completeness(mask, affine_2mm(), 0.0, 0.0)
    assert not states[19].complete and "cranial" in states[19].reason
    path = tmp_path / "c.json"
    centroids = {v: np.array([1.0, 2.0, 3.0]) for v in states}
    write_centroids(path, centroids, states)
    records = json.loads(path.read_text())
    assert [r["complete"] for r in records] == [False, True, True, True]
    assert "reason" in records[0] and "reason" not in records[1]
    assert set(read_centroids(path)) == set(states)  # the reference's reader still reads it
    assert read_completeness(path)[19] == Completeness(False, states[19].reason)
    # a reference file without the keys: to be found from the mask
    path.write_text(json.dumps([{"label": 20, "X": 1, "Y": 2, "Z": 3}]))
    assert read_completeness(path) is None


def test_volume_thresholds_stay_as_options():
    mask = mini_spine()
    states = vertebra_completeness(mask, affine_2mm(), min_cranial_mm3=1e9, min_caudal_mm3=0.0)
    assert not states[19].complete and "volume" in states[19].reason
    assert states[22].complete


def test_location_json_local_writes_every_vertebra_with_completeness(tmp_path):
    pid = "p1"
    folder = tmp_path / "raw" / pid
    save_nifti(folder / f"{pid}_msk.nii.gz", mini_spine()[:, :, 12:], affine_2mm())
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 0
    records = json.loads((folder / f"{pid}.json").read_text())
    assert [r["label"] for r in records] == [19, 20, 21, 22]
    assert [r["complete"] for r in records] == [True, True, True, False]
    assert "caudal" in records[-1]["reason"]


def test_a_body_cut_by_its_neighbours_label_is_flagged_and_a_narrow_disc_is_not():
    mask = mini_spine(tp=False)
    z = np.flatnonzero((mask == 20).any(axis=(0, 1)))
    body = mask[:, 16:32, :] == 20
    cut = mask.copy()
    upper = cut[:, 16:32, z[-1] - 4 : z[-1] + 1]
    upper[body[:, :, z[-1] - 4 : z[-1] + 1]] = 19  # T12's label takes the top of L1's body
    states = vertebra_completeness(cut, affine_2mm(), 0.0, 0.0)
    assert {v for v, s in states.items() if not s.complete} == {19, 20}
    assert "label of T12 (19)" in states[20].reason and "no disc" in states[20].reason
    # the same spine with its discs narrowed to one voxel (2 mm): nothing is cut
    narrow = mask.copy()
    for vid in (20, 21, 22):
        zz = np.flatnonzero((mask == vid).any(axis=(0, 1)))
        shift = 16 - 12 - 1  # each body grows upwards until one voxel below the body above
        narrow[:, 16:32, zz[-1] + 1 : zz[-1] + 1 + shift][
            mask[:, 16:32, zz[-1] : zz[-1] + 1].repeat(shift, 2) == vid
        ] = vid
    assert all(s.complete for s in vertebra_completeness(narrow, affine_2mm(), 0.0, 0.0).values())
    # off: the option turns the test off
    assert all(s.complete for s in vertebra_completeness(cut, affine_2mm(), 0.0, 0.0, 20.0, 0.0).values())


def test_a_fragment_level_with_its_neighbour_does_not_refuse_the_spine(tmp_path):
    """A sliver of T11 at the scan's cranial edge, posterior elements only, level with T12's
    centroid: it is flagged as a fragment and the complete vertebrae below keep their centroids
    (the stacking check used to refuse the whole patient: 'labels 18 (T11) and 19 (T12) are not
    stacked')."""
    mask = mini_spine()
    c = mask.shape[0] // 2
    z = int(round(np.argwhere(mask == 19)[:, 2].mean()))
    mask[c + 3 : c + 6, 0:3, z - 1 : z + 2] = 18  # 27 voxels beside T12's spinous process
    pid = "p1"
    folder = tmp_path / "raw" / pid
    save_nifti(folder / f"{pid}_msk.nii.gz", mask, affine_2mm())
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 0
    records = {r["label"]: r for r in json.loads((folder / f"{pid}.json").read_text())}
    assert sorted(records) == [18, 19, 20, 21, 22]
    assert not records[18]["complete"] and "fragment" in records[18]["reason"]
    assert all(records[v]["complete"] for v in (19, 20, 21))


def test_the_stacking_check_skips_fragments_and_tests_every_volume():
    affine = affine_2mm()
    centres = {
        18: np.array([0.0, 0.0, 50.0]),
        19: np.array([0.0, 20.0, 50.5]),
        20: np.array([0.0, 20.0, 35.0]),
    }
    volumes = {18: 200.0, 19: 40_000.0, 20: 42_000.0}
    assert location_json_local.stacking_problem(affine, centres, volumes) is None
    assert "not stacked" in location_json_local.stacking_problem(affine, centres, {**volumes, 18: 30_000.0})
    # an organ read as a vertebra is refused by its size
    problem = location_json_local.stacking_problem(affine, centres, {**volumes, 20: 600_000.0})
    assert "far more than any vertebra" in problem


@pytest.mark.parametrize("what", ["binary spine mask", "one label over every level"])
def test_a_mask_that_is_no_vertebra_mask_is_named_as_such(tmp_path, capsys, what):
    """A binary spine mask (read as C1) is refused for what it is, not as 'no complete vertebra'
    (the completeness step ran first and called its one label cut or small)."""
    mask = mini_spine(n_levels=6)
    mask[mask > 0] = 1 if what == "binary spine mask" else 20
    pid = "p1"
    save_nifti(tmp_path / "raw" / pid / f"{pid}_msk.nii.gz", mask, affine_2mm())
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "far more than any vertebra" in err and "--label_scheme" in err
    assert "no complete vertebra" not in err
    assert not (tmp_path / "raw" / pid / f"{pid}.json").exists()


@pytest.mark.parametrize(
    "option, value",
    [("--min_cut_contact_mm2", "nan"), ("--min_label_contact", "-1"), ("--min_cranial_volume_mm3", "inf")],
)
def test_threshold_options_are_checked_before_anything_runs(tmp_path, capsys, option, value):
    assert location_json_local.main(["--dataroot", str(tmp_path), option, value]) == 2
    assert f"error: {option} must be a finite number >= 0, got {float(value)}" in capsys.readouterr().err

"""Vertebrae cut by the scan's edge, with known answers:

1. A vertebral body cut by the scan's face was taken for complete when the face's layer of source
   voxels fell between two rows of the coarse (2 mm) straightening that finds the bodies: the
   centre sample of each straightened voxel was tested, so at 1 mm (and finer) slices whether a
   cut was seen depended on where the rows happened to fall. The half body then got a crop and
   heights (13 of 25 mm: a "severe fracture" that is not there).
2. A scan whose edge cuts an end vertebra through its posterior elements (a remnant above 10 % of
   the median vertebra, behind its neighbour) was refused as a whole ("the spine curve runs along
   the anterior-posterior axis; the image orientation looks wrong"): the remnant's centroid steered
   the curve. Just before that, its "body" (its posterior elements) made the next vertebra, whole
   in the scan, look cut by its label.
"""

import json
import logging

import numpy as np
import pytest

from data.nifti_io import load_mask, save_nifti
from straighten import location_json_local, straighten_mask_3d
from straighten.centroids import curve_labels, vertebra_completeness
from tests.conftest import shared


def straight_spine(levels=(18, 19, 20, 21), spacing=(1.0, 1.0, 1.0), body_h=25.0, disc=6.0, margin=20.0):
    """A straight spine along +z (RAS), cranial level on top: cylindrical bodies (radius 20 mm,
    centred 20 mm anterior), pedicles, a lamina behind the canal and a spinous process.
    Returns (mask, affine, {vid: (z bottom, z top) of its body in mm})."""
    sx, sy, sz = spacing
    length = len(levels) * (body_h + disc) + 2 * margin
    nx, ny, nz = int(round(120 / sx)), int(round(120 / sy)), int(round(length / sz))
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy + 5.0  # anterior +
    z = np.arange(nz) * sz
    X, Y = np.meshgrid(x, y, indexing="ij")
    body = X**2 + (Y - 20) ** 2 <= 20**2
    r = np.sqrt(X**2 + (Y + 15) ** 2)
    lamina = (r >= 8) & (r <= 13) & (Y <= -15)
    pedicles = (np.abs(X) >= 8) & (np.abs(X) <= 13) & (Y >= -15) & (Y <= 3)
    spinous = (np.abs(X) <= 3) & (Y <= -26) & (Y >= -50)
    posterior = lamina | pedicles | spinous
    mask = np.zeros((nx, ny, nz), np.uint8)
    extents = {}
    top = length - margin
    for vid in levels:
        z0 = top - body_h
        extents[vid] = (z0, top)
        in_body = (z >= z0) & (z < top)
        in_post = (z >= z0 + 5) & (z < top - 5)
        mask[:, :, in_body] = np.where(body[:, :, None], vid, mask[:, :, in_body])
        sub = mask[:, :, in_post]
        mask[:, :, in_post] = np.where(posterior[:, :, None] & (sub == 0), vid, sub)
        top = z0 - disc
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = [x[0], y[0], 0.0]
    return mask, affine, extents


def cut_above(mask, affine, z_mm, sz):
    """The scan with every slice at or above ``z_mm`` removed (the cranial field-of-view edge)."""
    return mask[:, :, : int(round(z_mm / sz))].copy(), affine


@pytest.mark.parametrize("sz", [1.0, 0.5])
def test_a_body_cut_by_the_scans_face_is_flagged_wherever_the_rows_fall(sz):
    mask, affine, extents = straight_spine(spacing=(1.0, 1.0, sz))
    z0, _ = extents[18]
    judged_complete = []
    for kept_mm in np.arange(11.0, 15.0, sz):  # the top body keeps 11-14.5 of its 25 mm (rows fall anywhere)
        cut, aff = cut_above(mask, affine, z0 + kept_mm, sz)
        if vertebra_completeness(cut, aff)[18].complete:
            judged_complete.append(float(kept_mm))
    assert not judged_complete, (
        f"T11 cut by the cranial face taken for complete when keeping {judged_complete} mm"
    )


@pytest.mark.parametrize("sz", [1.0, 0.5])
def test_a_body_one_slice_from_the_face_stays_complete(sz):
    """The other side of the same rule: a disc slice between the body and the face is no cut."""
    mask, affine, extents = straight_spine(spacing=(1.0, 1.0, sz))
    _, z1 = extents[18]
    for gap in (sz, 2 * sz):
        cut, aff = cut_above(mask, affine, z1 + gap, sz)
        assert vertebra_completeness(cut, aff)[18].complete, gap
    cut, aff = cut_above(mask, affine, z1, sz)
    state = vertebra_completeness(cut, aff)[18]
    assert not state.complete and "cranial" in state.reason


def test_a_cut_half_body_gets_no_crop_or_height(tmp_path):
    """End to end: before the fix the half body of T11 was cropped and measured 13/12/8 mm."""
    logging.disable(logging.WARNING)
    try:
        mask, affine, extents = straight_spine()
        z0, _ = extents[18]
        for kept_mm in (12.0, 13.0, 14.0):
            root = tmp_path / f"kept{kept_mm:g}"
            cut, aff = cut_above(mask, affine, z0 + kept_mm, 1.0)
            save_nifti(root / "raw" / "p" / "p_msk.nii.gz", cut, aff, dtype=np.uint8)
            assert location_json_local.main(["--dataroot", str(root)]) == 0
            records = {r["label"]: r for r in json.loads((root / "raw" / "p" / "p.json").read_text())}
            assert records[18]["complete"] is False, kept_mm
            args = [
                "--dataroot",
                str(root),
                "--labels_only",
                "--crop_mm",
                "96",
                "96",
                "64",
                "--spacing_mm",
                "2",
            ]
            assert straighten_mask_3d.main(args) == 0
            assert not (root / "straightened" / "label" / "p_18.nii.gz").exists(), kept_mm
    finally:
        logging.disable(logging.NOTSET)


def _0007_cut_at(k):
    """The 0007 mask (IPL, 1 mm) with its first ``k`` slices (the cranial ones) removed."""
    m = load_mask(shared("masks/0007_msk.nii.gz"))
    affine = m.affine.copy()
    affine[:3, 3] = m.affine[:3, :3] @ [k, 0, 0] + m.affine[:3, 3]
    return np.ascontiguousarray(m.array[k:]), affine


@pytest.mark.parametrize(
    "k, l3_complete",
    # L3's body starts at slice 112 of 0007 (straightened at 1 mm: 2 body voxels on slice 112, 27 on
    # 113, 59 on 114): cut at 112 its face holds under 20 mm2 of body, from 113 on more. At 110-116
    # the remnant of L2 is its posterior elements (10-21 % of the median vertebra).
    [(110, True), (112, True), (113, False), (116, False)],
)
def test_a_scan_cut_through_posterior_elements_is_not_refused(k, l3_complete):
    mask, affine = _0007_cut_at(k)
    states = vertebra_completeness(mask, affine)  # raised ValueError (k >= 112), or flagged L3 (k < 112)
    assert states[21].complete is False  # L2: only posterior elements left
    assert states[22].complete is l3_complete, states[22]
    assert states[23].complete and states[24].complete


def test_one_body_beside_a_remnant_is_judged_not_called_a_wrong_orientation(tmp_path, capsys):
    """0007 cut at slice 174 leaves L4's posterior elements and an L5 whose body the same edge
    cuts: both are judged not measurable and the scan is refused for having no complete vertebra
    (it was refused as a wrong orientation, the remnant being one of only two labels)."""
    mask, affine = _0007_cut_at(174)
    states = vertebra_completeness(mask, affine)
    assert sorted(states) == [23, 24]
    assert states[23].complete is False and "posterior elements" in states[23].reason
    assert states[24].complete is False and "cranial edge" in states[24].reason
    save_nifti(tmp_path / "raw" / "p" / "p_msk.nii.gz", mask, affine, dtype=np.uint8)
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 1
    assert "no complete vertebra" in capsys.readouterr().err


def test_a_patient_cut_through_posterior_elements_is_straightened(tmp_path):
    mask, affine = _0007_cut_at(112)
    save_nifti(tmp_path / "raw" / "p" / "p_msk.nii.gz", mask, affine, dtype=np.uint8)
    assert location_json_local.main(["--dataroot", str(tmp_path)]) == 0
    args = [
        "--dataroot",
        str(tmp_path),
        "--labels_only",
        "--spacing_mm",
        "2",
        "--crop_mm",
        "128",
        "128",
        "64",
    ]
    assert straighten_mask_3d.main(args) == 0
    done = json.loads((tmp_path / "straightened" / "curve" / "p.json").read_text())
    assert sorted(int(v) for v in done["crops"]) == [22, 23, 24]


def test_end_vertebrae_behind_their_neighbour_do_not_steer_the_curve():
    """Pure rule: an end centroid whose step to its neighbour runs along the AP axis is left out;
    a lordotic but stacked end vertebra (40 deg from S-I) is kept."""
    volumes = {v: 50_000.0 for v in (20, 21, 22, 23, 24)}
    volumes[20] = 8_000.0
    centres = {
        20: np.array([0.0, -30.0, 12.0]),  # L1 remnant: 30 mm behind L2, 12 mm above
        21: np.array([0.0, 0.0, 0.0]),
        22: np.array([0.0, 3.0, -33.0]),
        23: np.array([0.0, 8.0, -66.0]),
        24: np.array([0.0, 8.0 + 27.0 * np.tan(np.radians(40)), -93.0]),  # steep L5
    }
    assert curve_labels(volumes) == [20, 21, 22, 23, 24]
    assert curve_labels(volumes, centres) == [21, 22, 23, 24]
    # the remnant beside a single body: that body alone (too few for a curve, said by the caller)
    pair = {20: volumes[20], 21: volumes[21]}
    assert curve_labels(pair, centres) == [21]
    # two whole vertebrae one behind the other are no remnant: kept (a wrong orientation is refused later)
    assert curve_labels({20: 50_000.0, 21: 50_000.0}, centres) == [20, 21]
    # a whole L5 slipped 50 deg from S-I (a listhesis) is no remnant: it keeps steering the curve
    slipped = dict(centres)
    slipped[24] = centres[23] + 30.0 * np.array([0.0, np.sin(np.radians(50)), -np.cos(np.radians(50))])
    assert curve_labels(volumes, slipped) == [21, 22, 23, 24]

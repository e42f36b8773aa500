"""Phantom quirks of issue 6 with known answers: transitional anatomy (L6, T13), a missing level
(a severe wedge below the gap), anterior osteophytes and the rim rule that leaves them out."""

import json

import numpy as np
import pytest

from data.label_schemes import SACRUM, neighbours, parse_levels
from data.nifti_io import load_mask
from data.phantom import end_elements, generate
from evaluation.heights import body_heights
from straighten import straighten_mask_3d


@pytest.mark.parametrize(
    "levels, cranial, caudal",
    [
        ("T10-L5", 16, SACRUM),
        ("T10,T11,L1,L2", 16, 22),
        ("L3,L4,L5,L6", 21, SACRUM),
        ("T12,T13,L1", 18, 21),
        ("T13,L1", 19, 21),
        ("T11,T12,T13", 17, 20),
    ],
)
def test_partial_end_vertebrae_around_transitional_levels(levels, cranial, caudal):
    assert end_elements(parse_levels(levels)) == (cranial, caudal)


@pytest.mark.slow
@pytest.mark.parametrize(
    "levels, expected",
    [
        ("L4,L5,L6", {23: (22, 24), 24: (23, 25), 25: (24, None)}),  # L6 above the sacrum
        ("T12,T13,L1", {19: (18, 28), 28: (19, 20), 20: (28, 21)}),  # T13 between T12 and L1
    ],
)
def test_transitional_phantom_straightens_with_the_right_neighbours(tmp_path, levels, expected):
    """L6 and T13 are drawn, straightened and de-pedicled; each crop's neighbours come from the labels."""
    rows = generate(tmp_path, 1, 2, 2.0, levels=levels, fracture_fraction=0.0, progress=False)
    assert [r["vid"] for r in rows] == list(expected)
    args = ["--dataroot", str(tmp_path), "--spacing_mm", "2.0", "--crop_mm", "128", "128", "64"]
    assert straighten_mask_3d.main(args) == 0
    curve = json.loads((tmp_path / "straightened/curve/phantom000.json").read_text())
    assert sorted(int(v) for v in curve["crops"]) == sorted(expected)
    truth = load_mask(tmp_path / "truth/phantom000/phantom000_body_msk.nii.gz")
    by_vid = {r["vid"]: r for r in rows}
    for vid, nbrs in expected.items():
        lab = load_mask(tmp_path / f"straightened/label/phantom000_{vid}.nii.gz")
        present = [int(v) for v in np.unique(lab.array) if v]
        assert neighbours(vid, present) == nbrs, (vid, present)
        body = lab.array == vid
        # de-pedicled: the body alone (the truth body volume within 10 %)
        ratio = body.sum() * np.prod(lab.spacing) / ((truth.array == vid).sum() * np.prod(truth.spacing))
        assert ratio == pytest.approx(1.0, abs=0.10), (vid, ratio)
        got = body_heights(body, lab.spacing).as_array()
        want = np.array([by_vid[vid][f"fractured_{k}_mm"] for k in ("anterior", "middle", "posterior")])
        assert np.abs(got - want).max() <= 2.5, (vid, got, want)  # a 2 mm voxel plus the partial volume
    if 25 in expected:
        lab = load_mask(tmp_path / "straightened/label/phantom000_25.nii.gz")
        assert SACRUM in lab.array

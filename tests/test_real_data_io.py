"""The shared real volumes load, reorient to I-P-L, and their masks stay on the anatomy."""

import numpy as np
import pytest
from scipy import ndimage

from data.label_schemes import SACRUM
from data.nifti_io import check_same_grid, load_case, load_ct, load_mask, reorient
from tests.conftest import shared


def contrast(ct: np.ndarray, sel: np.ndarray, background: np.ndarray) -> float:
    """Mean HU inside a structure minus the mean in a thin shell around it."""
    ring = ndimage.binary_dilation(sel, iterations=2) & ~sel & background
    return float(ct[sel].mean() - ct[ring].mean())


def centroid_axis0(mask: np.ndarray, vid: int) -> float:
    return float(np.mean(np.nonzero(mask == vid)[0]))


@pytest.mark.parametrize(
    "ct_rel, mask_rel, scheme, expected",
    [
        (
            "real/totalseg_abdomen_ct/ct.nii.gz",
            "real/totalseg_abdomen_ct/vert_msk_totalseg_ids.nii.gz",
            "totalseg",
            [18, 19, 20, 21, 22, 23, 24, SACRUM],
        ),
        ("real/tptbox_l3_ct/ct.nii.gz", "real/tptbox_l3_ct/vert_msk.nii.gz", "verse", [21, 22, 23]),
        (
            "real/unpaired_mr_ct/ct.nii.gz",
            "real/unpaired_mr_ct/ct_seg_totalseg_ids.nii.gz",
            "totalseg",
            [18, 19, 20, 21],
        ),
    ],
)
def test_ct_and_mask_reorient_together(ct_rel, mask_rel, scheme, expected):
    ct, mask = load_case(shared(ct_rel), shared(mask_rel), scheme)
    ct, mask = reorient(ct), reorient(mask)
    assert ct.axcodes == mask.axcodes == ("I", "P", "L")
    check_same_grid(ct, mask)
    present = sorted(int(v) for v in np.unique(mask.array) if v)
    assert present == sorted(expected)
    # axis 0 runs superior to inferior: vertebrae come in anatomical order
    order = [centroid_axis0(mask.array, v) for v in expected]
    assert order == sorted(order)
    # every vertebra mask sits on bone: much denser inside than in the shell around it
    for v in expected:
        assert contrast(ct.array, mask.array == v, mask.array == 0) > 100, v


def test_totalseg_mask_maps_to_verse_t11_to_l5():
    mask = load_mask(shared("real/totalseg_abdomen_ct/vert_msk_totalseg_ids.nii.gz"), "totalseg")
    vertebrae = sorted(int(v) for v in np.unique(mask.array) if 0 < v < 26)
    assert vertebrae == list(range(18, 25))  # T11..L5
    assert SACRUM in np.unique(mask.array)  # S1 is kept as the sacrum, not as a vertebra


def test_chest_ct_masks_follow_reorientation():
    ct = reorient(load_ct(shared("real/chest_heart_ct/ct.nii.gz")))
    labels = reorient(load_ct(shared("real/chest_heart_ct/msk_heart1_aorta2_pulmonary3.nii.gz")))
    assert ct.axcodes == ("I", "P", "L")
    for v in (1, 2, 3):  # contrast-filled heart and vessels
        assert contrast(ct.array, labels.array == v, labels.array == 0) > 150


@pytest.mark.parametrize(
    "rel, labels",
    [
        ("masks/sub-verse004_vert_msk.nii.gz", list(range(16, 25))),
        ("masks/0007_msk.nii.gz", list(range(16, 25))),
    ],
)
def test_mask_only_inputs_reorient(rel, labels):
    mask = reorient(load_mask(shared(rel)))
    assert mask.axcodes == ("I", "P", "L")
    assert sorted(int(v) for v in np.unique(mask.array) if v) == labels
    order = [centroid_axis0(mask.array, v) for v in labels]
    assert order == sorted(order)


def test_mr_volume_and_labels_share_a_grid():
    mr = load_ct(shared("real/unpaired_mr_ct/mr.nii.gz"))
    seg = load_ct(shared("real/unpaired_mr_ct/mr_seg_totalseg_mr_ids.nii.gz"))
    check_same_grid(mr, seg)
    assert reorient(mr).shape == (20, 91, 117)

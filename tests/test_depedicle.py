"""De-pedicling synthetic vertebrae: the body stays whole, the posterior elements go."""

import numpy as np
import pytest
from scipy import ndimage

from data.label_schemes import SACRUM
from straighten.depedicle import body_mask, depedicle


def vertebra(shape=(60, 90, 70), centre_lr=35, concave=0):
    """Axes (height, AP, LR): a 24 x 30 x 40 body, pedicles, a lamina ring and a spinous process."""
    h, a, r = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = r - centre_lr
    body = (h >= 18) & (h < 42) & (a >= 20) & (a < 50) & (np.abs(r) < 20)
    if concave:  # concave endplates: the centre is lower at the top and bottom
        dip = concave * np.clip(1 - ((a - 35) / 15.0) ** 2 - (r / 20.0) ** 2, 0, 1)
        body &= (h >= 18 + dip) & (h < 42 - dip)
    canal = ((a - 58) / 8.0) ** 2 + (r / 10.0) ** 2 <= 1
    ring = (((a - 58) / 14.0) ** 2 + (r / 16.0) ** 2 <= 1) & ~canal & (a >= 48) & (h >= 20) & (h < 36)
    spinous = (a >= 70) & (a < 88) & (np.abs(r) < 3) & (h >= 26 - (a - 70) // 3) & (h < 36 + (a - 70) // 2)
    transverse = (np.abs(np.abs(r) - 25) < 12) & (np.abs(a - 56) < 4) & (h >= 24) & (h < 32)
    body_only = body.copy()
    whole = body | ring | spinous | transverse
    return whole, body_only


def behind_the_wall(got, body, voxels=1):
    """Kept voxels more than ``voxels`` behind the body's posterior wall (a = 50)."""
    return (got & ~body)[:, 50 + voxels :].sum()


def test_body_kept_and_processes_removed():
    whole, body = vertebra()
    got = body_mask(whole)
    assert behind_the_wall(got, body) == 0  # at most the pedicle roots at the wall itself
    assert (got & ~body).sum() < 0.02 * body.sum()
    assert got.sum() >= 0.97 * body.sum()
    assert (whole & ~body).sum() > 0.3 * body.sum()  # there was a lot to remove


def test_concave_endplates_and_an_off_centre_vertebra():
    whole, body = vertebra(concave=3, centre_lr=26)
    got = body_mask(whole)
    assert behind_the_wall(got, body) == 0
    assert got.sum() >= 0.97 * body.sum()


@pytest.mark.parametrize("angle", [-12, 12])
def test_tilted_vertebra(angle):
    whole, body = vertebra()
    rot = [
        ndimage.rotate(x.astype(np.uint8), angle, axes=(0, 1), reshape=False, order=0) > 0
        for x in (whole, body)
    ]
    got = body_mask(rot[0])
    assert (got & ~rot[1]).sum() < 0.03 * rot[1].sum()
    assert got.sum() >= 0.93 * rot[1].sum()


def test_depedicle_treats_each_vertebra_and_keeps_other_labels():
    whole, body = vertebra()
    labels = np.zeros((120, 90, 70), np.uint8)
    labels[:60][whole] = 20
    labels[60:][whole] = 21
    labels[118:, 20:30, 30:40] = SACRUM
    out = depedicle(labels)
    for kept, expected in ((out[:60] == 20, body), (out[60:118] == 21, body[:58])):
        assert behind_the_wall(kept, expected) == 0
        assert not (expected & ~kept).any()
    assert (out[118:, 20:30, 30:40] == SACRUM).all()


def test_empty_and_body_only_masks():
    assert not body_mask(np.zeros((5, 5, 5), bool)).any()
    _, body = vertebra()
    assert (body_mask(body) == body).all()  # nothing to remove

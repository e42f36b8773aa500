import numpy as np
import pytest

from evaluation.heights import (
    BodyHeights,
    body_heights,
    column_heights,
    genant_from_heights,
    genant_grade,
    height_reduction,
    heights_from_columns,
)


def box(h, ap, lr, pad=3):
    m = np.zeros((h + 2 * pad, ap + 2 * pad, lr + 2 * pad), bool)
    m[pad : pad + h, pad : pad + ap, pad : pad + lr] = True
    return m


def test_box_heights_are_its_height_in_mm():
    assert body_heights(box(20, 30, 40), 1.0).as_array() == pytest.approx([20, 20, 20])
    # anisotropic voxels: 10 voxels of 2.5 mm
    assert body_heights(box(10, 12, 16), (2.5, 1.0, 1.0)).as_array() == pytest.approx([25, 25, 25])


def test_wedge_thirds_take_medians_of_their_columns():
    # anterior (low axis-1 index) columns 12 high, posterior 24 high, linear in between: 30 columns
    m = np.zeros((30, 30, 10), bool)
    for j in range(30):
        height = 12 + round(12 * j / 29)
        m[30 - height :, j, :] = True
    hts = body_heights(m, 1.0)
    cols = np.array([12 + round(12 * j / 29) for j in range(30)], float)
    assert hts.anterior == pytest.approx(np.median(cols[:10]))
    assert hts.middle == pytest.approx(np.median(cols[10:20]))
    assert hts.posterior == pytest.approx(np.median(cols[20:]))


def test_only_the_central_lr_planes_count():
    m = box(20, 30, 40, pad=0)
    short = np.r_[0:12, 28:40]  # outside the central 40 % of the 40 planes (12..27)
    m[:, :, short] = False
    m[5:15, :, short] = True
    assert body_heights(m, 1.0).as_array() == pytest.approx([20, 20, 20])
    # with every plane in play the 24 short planes win the median
    assert body_heights(m, 1.0, lr_fraction=1.0).as_array() == pytest.approx([10, 10, 10])


def test_column_extent_ignores_holes():
    m = box(20, 6, 6, pad=0)
    m[8:12] = False  # a gap inside every column
    assert np.nanmax(column_heights(m, 1.0)) == 20


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        body_heights(np.zeros((5, 5, 5), bool))
    with pytest.raises(ValueError):
        heights_from_columns(np.full((4, 4), np.nan))


def test_genant_boundaries():
    assert [genant_grade(r) for r in (0.0, 0.199, 0.20, 0.249, 0.25, 0.40, 0.401, 0.9)] == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    healthy = BodyHeights(25.0, 24.0, 26.0)
    assert height_reduction(healthy, BodyHeights(15.0, 24.0, 26.0)) == pytest.approx([0.4, 0, 0])
    assert genant_from_heights(healthy, BodyHeights(15.0, 24.0, 26.0)) == 2
    assert genant_from_heights(healthy, BodyHeights(25.0, 12.0, 26.0)) == 3
    assert genant_from_heights(healthy, healthy) == 0

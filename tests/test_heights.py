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
    measure_body,
    rim_columns,
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
    # steps 2-4 (columns, thirds, medians) in the crop's axes; the frame is tested on tilted boxes
    hts = body_heights(m, 1.0, align=False)
    cols = np.array([12 + round(12 * j / 29) for j in range(30)], float)
    assert hts.anterior == pytest.approx(np.median(cols[:10]))
    assert hts.middle == pytest.approx(np.median(cols[10:20]))
    assert hts.posterior == pytest.approx(np.median(cols[20:]))
    # its own frame is the bisector of its endplates, tilted by half the wedge (22.5 deg)
    own = measure_body(m, 1.0)
    assert 5 < own.tilt_deg < 17


def smooth_wedge(voxel_mm: float) -> np.ndarray:
    """A wedge 30 mm long (AP) and 10 mm wide whose height rises linearly from 12 to 24 mm, with its
    flat endplate 4 mm above the array's end, drawn at ``voxel_mm`` (voxel centres inside)."""
    n = round(1 / voxel_mm)
    depth = (np.arange(34 * n) + 0.5) / n
    ap = (np.arange(30 * n) + 0.5) / n
    height = 12 + 12 * ap / 30
    inside = (depth[:, None] >= 30 - height[None, :]) & (depth[:, None] < 30)
    return np.repeat(inside[:, :, None], 10 * n, axis=2)


def test_tilted_heights_do_not_step_with_the_voxel_size():
    # In the wedge's own frame (tilted 11 deg) every column crosses the voxel grid obliquely: its
    # ends come from the resampled mask's 0.5 level, not whole resampled voxels, so 1 mm voxels
    # measure what voxels a third as big do (whole voxels were 0.8 mm short anteriorly).
    fine = measure_body(smooth_wedge(1 / 3), 1 / 3)
    coarse = measure_body(smooth_wedge(1.0), 1.0)
    assert fine.tilt_deg == pytest.approx(coarse.tilt_deg, abs=0.5)
    assert coarse.heights.as_array() == pytest.approx(fine.heights.as_array(), abs=0.3)


def test_a_box_whose_ap_axis_turns_keeps_its_height():
    # A 20 mm box (10 voxels of 2 mm) with a skewed cross-section: its AP axis turns, its height
    # axis does not. Resampled on that frame, samples fall on the box's faces at exactly 0.5;
    # counting them as voxels made the box 22 mm, whatever the rounding of the voxel size.
    m = np.zeros((16, 40, 30), bool)
    for k in range(4, 26):
        shift = round((k - 4) * 0.15)
        m[3:13, 5 + shift : 25 + shift, k] = True
    for spacing in [(2.0, 2.0, 2.0), (1.99999996, 2.0, 1.99999999), (2.00000004, 2.0, 2.0)]:
        measured = measure_body(m, spacing)
        assert abs(measured.frame[1, 0]) < 1e-9 and abs(measured.frame[1, 1]) < 0.99  # the AP axis turned
        assert measured.tilt_deg == pytest.approx(0.0, abs=1e-6)
        assert measured.heights.as_array() == pytest.approx([20.0, 20.0, 20.0], abs=1e-6)


def test_a_body_touching_the_array_end_keeps_its_height():
    # resampling reaches a face only through a background voxel beyond it; at the array's end
    # there was none, and a 7-voxel body lost half a voxel there (or a whole one with 2 mm rows)
    m = np.zeros((10, 20, 20), bool)
    m[3:10, 3:17, 2:18] = True
    for spacing, height in [(1.0, 7.0), ((2.0, 1.0, 1.0), 14.0), ((0.7, 1.3, 0.9), 4.9)]:
        measured = measure_body(m, spacing)
        assert measured.heights.as_array() == pytest.approx([height] * 3, abs=1e-6)
        assert measured.tilt_deg == pytest.approx(0.0, abs=1e-6)


def test_column_ends_cross_half_between_samples():
    # a binary column: first to last voxel
    m = np.zeros((8, 1, 1), bool)
    m[2:6] = True
    assert column_heights(m, 2.0)[0, 0] == pytest.approx(8.0)
    # a resampled field: the lower end at its sample of exactly 0.5, the upper one half-way
    # between 0.9 and 0.1; 3.5 samples of 2 mm
    field = np.array([0, 0.5, 1, 1, 0.9, 0.1, 0], np.float32)[:, None, None]
    assert column_heights(field, 2.0)[0, 0] == pytest.approx(7.0)
    # the same crossings seen the other way up
    assert column_heights(field[::-1], 2.0)[0, 0] == pytest.approx(7.0)


def test_only_the_central_lr_planes_count():
    m = box(20, 30, 40, pad=0)
    short = np.r_[0:12, 28:40]  # outside the central 40 % of the 40 planes (12..27)
    m[:, :, short] = False
    m[5:15, :, short] = True
    assert body_heights(m, 1.0).as_array() == pytest.approx([20, 20, 20])
    # with every plane in play the 24 short planes win the median (the two beside each 10 mm step
    # blend with their tall neighbours, antialiased(): the median is one of them)
    assert body_heights(m, 1.0, lr_fraction=1.0).as_array() == pytest.approx([10, 10, 10], abs=0.1)


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


def tilted_box(height, depth, width, tilt_deg, n=72, step=1.0, offset=(0.0, 0.0, 0.0)):
    """A box rotated by ``tilt_deg`` about the LR axis, sampled on an (h, ap, lr) grid whose voxel
    centres lie ``offset`` voxels off the box's centre."""
    g = (np.arange(n) - n / 2) * step
    h, a, r = np.meshgrid(*((g + o * step) for o in offset), indexing="ij")
    t = np.radians(tilt_deg)
    hh, aa = h * np.cos(t) + a * np.sin(t), -h * np.sin(t) + a * np.cos(t)
    return (np.abs(hh) <= height / 2) & (np.abs(aa) <= depth / 2) & (np.abs(r) <= width / 2)


@pytest.mark.parametrize("tilt", [0.0, 12.0, 22.0])
def test_tilted_box_is_measured_in_its_own_frame_with_its_tilt(tilt):
    m = measure_body(tilted_box(30, 34, 44, tilt))
    assert m.heights.as_array() == pytest.approx([30, 30, 30], abs=1.0)
    assert m.tilt_deg == pytest.approx(tilt, abs=1.0)
    if tilt > 20:  # along the crop's axis the columns are 30 / cos(22°) = 32.4 mm
        old = body_heights(tilted_box(30, 34, 44, tilt), align=False).as_array()
        assert old == pytest.approx([32, 32, 32], abs=1.0)


@pytest.mark.parametrize(
    "spacing",
    [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (1.0, 1.0, 3.0), (2.0, 2.0, 2.0), (2.5, 1.0, 1.0), (0.8, 0.8, 0.8)],
)
def test_a_box_keeps_the_crop_frame_and_its_voxel_heights(spacing):
    for size_mm in ((26, 34, 44), (25, 33, 41)):
        n = [round(d / s) for d, s in zip(size_mm, spacing, strict=True)]
        m = measure_body(box(*n), spacing)
        assert m.tilt_deg < 0.1
        assert m.heights.as_array() == pytest.approx([n[0] * spacing[0]] * 3, abs=1e-6)


@pytest.mark.parametrize("tilt, voxel_mm", [(12.0, 1.0), (-12.0, 1.0), (5.0, 0.5)])
def test_a_turned_box_has_its_tilt_and_height(tilt, voxel_mm):
    # At 1 mm the second round's threshold turned a 12° box by up to 0.9° more, and its heights
    # came up to 0.31 mm short. (A 5° box at 1 mm is off by up to 0.8° in the first round
    # already: its endplates' voxel steps are 11 mm long, and the fit sees two of them.)
    for offset in ((0.0, 0.0, 0.0), (0.95, 0.31, 0.42), (0.03, 0.75, 0.54)):
        mask = tilted_box(26, 34, 44, tilt, n=round(60 / voxel_mm), step=voxel_mm, offset=offset)
        m = measure_body(mask, voxel_mm)
        assert m.tilt_deg == pytest.approx(abs(tilt), abs=0.5), offset
        assert m.heights.as_array() == pytest.approx([26, 26, 26], abs=0.3), offset


def dished_body(height, depth, width, dip_mm, bevel_mm, voxel_mm, offset, n_mm=52):
    """An elliptic cylinder, mirror-symmetric about all three axes, whose endplates dip ``dip_mm``
    towards the middle and are bevelled over ``bevel_mm`` at the anterior and posterior walls,
    drawn at ``voxel_mm`` with its voxel centres ``offset`` voxels off the body's centre.
    Returns the mask and the body's heights by the definition on its analytic columns."""

    def half_height(a, r):
        rho2 = (2 * a / depth) ** 2 + (2 * r / width) ** 2
        bevel = np.clip(bevel_mm - (depth / 2 - np.abs(a)), 0, None)
        return np.where(rho2 <= 1, height / 2 - dip_mm * (1 - rho2) - bevel, -1.0)

    n = round(n_mm / voxel_mm)
    h, a, r = np.meshgrid(*((np.arange(n) - n / 2 + 0.5 + o) * voxel_mm for o in offset), indexing="ij")
    step = 0.05
    aa, rr = np.meshgrid(
        np.arange(-depth / 2, depth / 2 + 1e-9, step),
        np.arange(-width / 2, width / 2 + 1e-9, step),
        indexing="ij",
    )
    columns = np.where(half_height(aa, rr) > 0, 2 * half_height(aa, rr), np.nan)
    return np.abs(h) <= half_height(a, r), heights_from_columns(columns, ap_spacing_mm=step).as_array()


@pytest.mark.parametrize("offset", [(0.4, 0.15, 0.3), (0.1, 0.35, 0.0)])
def test_a_mirror_symmetric_body_keeps_the_crop_frame(offset):
    # The second round fitted the mask resampled on a grid half a voxel off the crop's and
    # thresholded at 0.5: every endplate sample was exactly 0.5, and the sign of the first
    # round's residual turn (0.01°) put it in or out, on one side of the body and not the other.
    # The frame turned by 1.5-1.9° and the anterior height parted from the posterior by 0.45 mm.
    mask, truth = dished_body(26, 34, 44, 1.5, 4.0, 0.5, offset)
    m = measure_body(mask, 0.5)
    assert m.tilt_deg < 0.1
    heights = m.heights.as_array()
    assert abs(heights[0] - heights[2]) < 0.15
    assert heights == pytest.approx(truth, abs=0.3)


def test_box_turned_about_the_long_axis_keeps_its_depth():
    # turned 30° about axis 0: the in-plane principal axes bring AP back to the body's own
    m = tilted_box(26, 30, 46, 0.0, n=80)
    turned = np.zeros_like(m)
    g = np.arange(80) - 40
    a, r = np.meshgrid(g, g, indexing="ij")
    t = np.radians(30)
    turned[:] = (
        (np.abs(a * np.cos(t) + r * np.sin(t)) <= 15) & (np.abs(-a * np.sin(t) + r * np.cos(t)) <= 23)
    )[None] & m.any(axis=(1, 2))[:, None, None]
    frame = measure_body(turned).frame
    assert abs(frame[1] @ np.array([0, np.cos(t), np.sin(t)])) == pytest.approx(1.0, abs=0.02)


def bevelled_box(height, depth, width, bevel_mm, n=70):
    """A box whose anterior wall (low axis 1) is bevelled at 45° top and bottom over ``bevel_mm``."""
    g = np.arange(n) - n / 2 + 0.5
    h, a, r = np.meshgrid(g, g, g, indexing="ij")
    box = (np.abs(h) <= height / 2) & (np.abs(a) <= depth / 2) & (np.abs(r) <= width / 2)
    from_wall = a + depth / 2
    return box & (np.abs(h) <= height / 2 - np.clip(bevel_mm - from_wall, 0, None))


def test_bevelled_rim_is_left_out():
    m = bevelled_box(26, 34, 44, 8)
    assert body_heights(m).as_array() == pytest.approx([26, 26, 26])
    # without the rim rule the bevel pulls the anterior median down
    assert body_heights(m, exclude_rim=False).anterior < 23


def test_rim_rule_keeps_a_wedge_fracture():
    # anterior 12 mm rising linearly to 24 mm posteriorly over 35 columns: no column is rim
    cols = np.tile((12 + 12 * np.arange(35) / 34)[:, None], (1, 10))
    assert not rim_columns(cols[:, 0], 1.0).any()
    with_rule = heights_from_columns(cols)
    assert with_rule.as_array() == pytest.approx(heights_from_columns(cols, exclude_rim=False).as_array())


def test_rim_rule_drops_only_steep_columns_at_the_wall_ends():
    plane = np.r_[np.nan, 8.0, 14.0, 20.0, np.full(20, 26.0), 12.0]
    rim = rim_columns(plane, 1.0)
    assert rim.tolist() == [False, True, True, True] + [False] * 20 + [True]
    # a short column inside the body (not at a wall end) stays
    inner = np.full(24, 26.0)
    inner[12] = 10.0
    assert not rim_columns(inner, 1.0).any()


def test_anisotropic_voxels_give_the_same_heights_in_mm():
    fine = tilted_box(30, 34, 44, 12.0, n=72)
    coarse = fine[:, :, ::3]  # 1 x 1 x 3 mm
    m = measure_body(coarse, (1.0, 1.0, 3.0))
    assert m.heights.as_array() == pytest.approx([30, 30, 30], abs=1.0)
    assert m.tilt_deg == pytest.approx(12.0, abs=1.0)


def test_cli_writes_heights_of_a_straightened_root(tmp_path, capsys):
    import csv
    import json

    from data.nifti_io import save_nifti
    from evaluation.heights import main

    label = tmp_path / "straightened" / "label"
    for vid, height in ((20, 24), (21, 30)):
        crop = np.zeros((40, 40, 50), np.uint8)
        crop[20 - height // 2 : 20 - height // 2 + height, 5:35, 5:45] = vid
        crop[0:3, 5:35, 5:45] = 19  # a neighbour in the crop does not count
        save_nifti(label / f"p1_{vid}.nii.gz", crop, np.diag([1.0, 1.0, 1.0, 1.0]), dtype=np.uint8)
    curve = tmp_path / "straightened" / "curve" / "p1.json"
    curve.parent.mkdir(parents=True)
    curve.write_text(
        json.dumps({"pid": "p1", "crops": {}, "not_measurable": {"22": "body cut by the scan's caudal edge"}})
    )
    out = tmp_path / "heights.csv"
    assert main(["--dataroot", str(tmp_path), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0])[:7] == [
        "pid",
        "vid",
        "complete",
        "height_anterior_mm",
        "height_middle_mm",
        "height_posterior_mm",
        "tilt_deg",
    ]
    by_vid = {int(r["vid"]): r for r in rows}
    assert float(by_vid[20]["height_middle_mm"]) == 24 and float(by_vid[21]["height_anterior_mm"]) == 30
    assert by_vid[20]["complete"] == "true" and float(by_vid[20]["tilt_deg"]) == 0
    assert by_vid[22]["complete"] == "false" and by_vid[22]["height_middle_mm"] == ""
    assert "1 not measurable" in capsys.readouterr().out
    assert main(["--dataroot", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.csv")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_region_not_measurable_is_an_empty_cell_with_its_reason(monkeypatch):
    """heights.csv writes an unmeasured region as rhlv.csv does (an empty cell, not 'nan'), and
    says which region in the reason column."""
    from evaluation import heights as h

    measured = h.BodyMeasurement(h.BodyHeights(float("nan"), 24.0, 25.0), 1.5, np.eye(3))
    monkeypatch.setattr(h, "measure_body", lambda *a, **k: measured)
    row = h.crop_row("p1", 20, np.ones((4, 4, 4), np.uint8) * 20, np.ones(3))
    assert row["height_anterior_mm"] == "" and row["height_middle_mm"] == 24.0
    assert row["complete"] is True and row["reason"] == "height not measurable: anterior"
    assert ",,24.0,25.0,1.5,height not measurable: anterior" in h.csv_text([row])

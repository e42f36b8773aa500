"""The squeezed sample of one slice (REFERENCE.md 3.3): known answers on a box vertebra between two."""

import numpy as np
import pytest

from data import vertebra_sample as vs

H, W = 48, 20


def _slice(x1=18, x2=30):
    """Upper neighbour 19 on rows 4-13, target 20 on rows [x1, x2), lower 21 on rows 34-43."""
    label = np.zeros((H, W), np.uint8)
    label[4:14, 5:15] = 19
    label[x1:x2, 5:15] = 20
    label[34:44, 5:15] = 21
    ct = np.repeat((np.arange(H, dtype=np.uint8) * 5)[:, None], W, axis=1)  # row r has value 5r
    return ct, label


def _rows(img):
    """One value per row (the images are constant along rows)."""
    return img[0, :, 0]


def test_band_placement_and_squeeze_content():
    ct, label = _slice()
    s = vs.build_sample(ct, label, 20, hole_rows=16, normal_ids=[19, 20, 21])
    assert (s["x1"][0], s["x2"][0], s["height"][0]) == (18, 30, 12)
    assert (s["band_top"][0], s["band_bottom"][0], s["hole_rows"][0]) == (16, 32, 16)  # centred on 24
    expect = np.full(H, -1.0, np.float32)
    expect[:16] = np.arange(2, 18) * 5 / 127.5 - 1  # CT rows [x1 - 16, x1)
    expect[32:] = np.arange(30, 46) * 5 / 127.5 - 1  # CT rows [x2, x2 + 16)
    np.testing.assert_allclose(_rows(s["ct_masked"]), expect, atol=1e-6)
    np.testing.assert_allclose(_rows(s["ct"]), np.arange(H) * 5 / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(_rows(s["hole"]), (np.arange(H) >= 16) & (np.arange(H) < 32))
    assert s["hole"].min() == 0 and s["hole"][0, 20, :].min() == 1  # whole rows
    np.testing.assert_array_equal(s["target_mask"][0], label == 20)
    for k in ("ct", "ct_masked", "hole", "target_mask", "neighbour_mask", "cam"):
        assert s[k].shape == (1, H, W) and s[k].dtype == np.float32
    for k in ("x1", "x2", "band_top", "band_bottom", "hole_rows"):
        assert s[k].shape == (1,) and s[k].dtype == np.int64


def test_neighbour_mask_and_cam_are_shifted_like_the_input():
    ct, label = _slice()
    cam = np.tile(np.linspace(0, 1, H, dtype=np.float32)[:, None], (1, W))
    s = vs.build_sample(ct, label, 20, 16, normal_ids=[19, 20, 21], cam_slice=cam)
    col = s["neighbour_mask"][0, :, 7]
    # 19 on rows 4-13 -> output rows 2-11 (shift by -2); 21 on rows 34-43 -> rows 36-45 (+2)
    expect = np.zeros(H)
    expect[2:12] = 1
    expect[36:46] = 1
    np.testing.assert_array_equal(col, expect)
    assert s["neighbour_mask"][0, :, 0].sum() == 0  # outside the boxes' columns
    assert s["neighbour_mask"][0, 16:32].sum() == 0  # nothing in the hole, the target excluded
    np.testing.assert_allclose(s["cam"][0, :16, 0], cam[2:18, 0])
    np.testing.assert_allclose(s["cam"][0, 32:, 0], cam[30:46, 0])
    assert s["cam"][0, 16:32].sum() == 0
    # cam_target: the CAM on the frame of ct, not squeezed (HGAM weighs the target rows with it)
    assert s["cam_target"].shape == (1, H, W) and s["cam_target"].dtype == np.float32
    np.testing.assert_array_equal(s["cam_target"][0], cam)
    only_lower = vs.build_sample(ct, label, 20, 16, normal_ids=[21])
    assert only_lower["neighbour_mask"][0, :16].sum() == 0
    assert only_lower["neighbour_mask"][0, 36:46, 5:15].all()
    no_cam = vs.build_sample(ct, label, 20, 16, normal_ids=[])
    assert no_cam["cam"].sum() == 0 and no_cam["cam_target"].sum() == 0  # no CAM: zeros
    assert no_cam["cam_target"].shape == (1, H, W)
    two = np.stack([ct, ct]), np.stack([label, label])
    stack = vs.build_sample(*two, 20, 16, [19, 21], np.stack([cam, cam]))
    assert stack["cam_target"].shape == (2, 1, H, W)
    np.testing.assert_array_equal(stack["cam_target"][1, 0], cam)


def test_taller_than_the_hole_gets_height_plus_margin():
    ct, label = _slice(x1=15, x2=33)  # 18 rows, hole of 12
    s = vs.build_sample(ct, label, 20, hole_rows=12, normal_ids=[19, 21], margin_rows=4)
    assert s["hole_rows"][0] == 22 and (s["band_top"][0], s["band_bottom"][0]) == (13, 35)
    # the target is never visible in the input: rows above come from rows < x1, below from >= x2
    np.testing.assert_allclose(_rows(s["ct_masked"])[:13], np.arange(2, 15) * 5 / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(_rows(s["ct_masked"])[35:], np.arange(33, 46) * 5 / 127.5 - 1, atol=1e-6)
    small = vs.build_sample(ct, label, 20, hole_rows=30, normal_ids=[], margin_rows=4)
    assert small["hole_rows"][0] == 30  # the fixed hole when it is tall enough


def test_clamping_near_the_borders_and_rows_without_source():
    ct, label = _slice()
    label[label == 20] = 0
    label[0:6, 5:15] = 20  # target at the top edge: centre 3, hole 16 -> [0, 16)
    s = vs.build_sample(ct, label, 20, 16, normal_ids=[])
    assert (s["band_top"][0], s["band_bottom"][0]) == (0, 16)
    np.testing.assert_allclose(_rows(s["ct_masked"])[16:], np.arange(6, 38) * 5 / 127.5 - 1, atol=1e-6)
    label[label == 20] = 0
    label[44:48, 5:15] = 20  # bottom edge: hole [32, 48), rows above from [28, 44)
    s = vs.build_sample(ct, label, 20, 16, normal_ids=[])
    assert (s["band_top"][0], s["band_bottom"][0]) == (32, 48)
    np.testing.assert_allclose(_rows(s["ct_masked"])[:32], np.arange(12, 44) * 5 / 127.5 - 1, atol=1e-6)
    # a source row outside the slice is -1 like the hole
    src, valid = vs.squeeze_rows(np.array([3]), np.array([9]), np.array([5]), np.array([10]), 12)
    np.testing.assert_array_equal(valid[0], [False, False, True, True, True] + [False] * 5 + [True, True])
    np.testing.assert_array_equal(src[0][valid[0]], [0, 1, 2, 9, 10])
    assert vs.hole_band(0, 40, 60, 48)[2] == 48  # never larger than the image


def test_stack_equals_slice_by_slice_and_absent_target_raises():
    rng = np.random.default_rng(0)
    slices = []
    for x1, x2 in ((18, 30), (16, 31), (20, 27)):
        ct, label = _slice(x1, x2)
        slices.append((ct + rng.integers(0, 3, ct.shape).astype(np.uint8), label))
    cts = np.stack([c for c, _ in slices])
    labels = np.stack([lab for _, lab in slices])
    batch = vs.build_sample(cts, labels, 20, 16, [19, 21], margin_rows=2)
    for i, (ct, label) in enumerate(slices):
        one = vs.build_sample(ct, label, 20, 16, [19, 21], margin_rows=2)
        for key, value in one.items():
            np.testing.assert_array_equal(batch[key][i], value, err_msg=key)
    assert batch["ct"].shape == (3, 1, H, W) and batch["x1"].shape == (3, 1)
    labels[1][labels[1] == 20] = 0
    with pytest.raises(ValueError, match=r"absent from slice\(s\) \[1\]"):
        vs.build_sample(cts, labels, 20, 16, [])


def test_small_components_are_ignored_without_touching_the_input():
    ct, label = _slice()
    label[40:42, 17:19] = 20  # a 4-pixel stray fragment of the target below it
    before = label.copy()
    s = vs.build_sample(ct, label, 20, 16, [], min_component_px=10)
    assert (s["x1"][0], s["x2"][0]) == (18, 30) and s["target_mask"][0, 40:42].sum() == 0
    np.testing.assert_array_equal(label, before)
    assert vs.build_sample(ct, label, 20, 16, [])["x2"][0] == 42  # kept without the threshold


def test_target_extent_is_vectorised():
    masks = np.zeros((3, 10, 4), bool)
    masks[0, 2:5, 1] = True
    masks[1, 7, :] = True
    x1, x2 = vs.target_extent(masks)
    np.testing.assert_array_equal(x1, [2, 7, 0])
    np.testing.assert_array_equal(x2, [5, 8, 0])


def test_slice_range_weights_and_ratio():
    vol = np.zeros((8, 6, 30), np.uint8)
    vol[2:6, 1:5, 5:25] = 20  # 20 slices along axis 2
    vol[3, 3, 28] = 20  # a stray voxel far away: ignored for the extent
    slices, centre, n = vs.slice_range(vol, 20, "sagittal")
    assert (n, centre) == (20, 14.5)
    np.testing.assert_array_equal(slices, np.arange(7, 23))  # central 16 of 5..24
    w = vs.slice_weights(slices, centre)
    assert w.sum() == pytest.approx(1) and w[7] == w[8] == w.max() and w[0] == w[-1] == w.min()
    assert vs.slice_ratio(14.5, centre, n) == 0 and vs.slice_ratio(24.5, centre, n) == pytest.approx(1)
    cor, c_centre, c_n = vs.slice_range(vol, 20, "coronal")
    assert (c_n, c_centre) == (4, 2.5) and cor.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="no voxel of vertebra 21"):
        vs.slice_range(vol, 21, "sagittal")


def test_coronal_padding_and_take_slices():
    vol = np.arange(4 * 10 * 6, dtype=np.uint8).reshape(4, 10, 6)
    cor = vs.take_slices(vol, 3, "coronal")
    np.testing.assert_array_equal(cor, vol[:, 3, :])
    padded, c0, c1 = vs.pad_columns(cor, 10, 0)
    assert padded.shape == (4, 10) and (c0, c1) == (2, 8)
    np.testing.assert_array_equal(padded[:, 2:8], cor)
    assert padded[:, :2].sum() == 0 and padded[:, 8:].sum() == 0
    wide, c0, c1 = vs.pad_columns(np.ones((4, 14)), 10)
    assert wide.shape == (4, 10) and (c0, c1) == (0, 10)
    stack = vs.take_slices(vol, [1, 4], "sagittal")
    assert stack.shape == (2, 4, 10)
    np.testing.assert_array_equal(stack[1], vol[:, :, 4])
    cstack = vs.take_slices(vol, [0, 3], "coronal")
    assert cstack.shape == (2, 4, 6)
    np.testing.assert_array_equal(cstack[1], vol[:, 3, :])


def test_seeded_draws_follow_the_triangular_weights():
    slices = np.arange(10, 20)
    w = vs.slice_weights(slices, 14.5)
    u = [vs.seeded_unit(3, 2, i) for i in range(4000)]
    assert u[:5] == [vs.seeded_unit(3, 2, i) for i in range(5)] and 0 <= min(u) and max(u) < 1
    assert vs.seeded_unit(3, 2, 0) != vs.seeded_unit(3, 3, 0) != vs.seeded_unit(4, 2, 0)
    counts = np.bincount([vs.draw_slice(slices, w, x) - 10 for x in u], minlength=10) / len(u)
    np.testing.assert_allclose(counts, w, atol=0.02)
    assert vs.draw_slice(slices, w, 0.0) == 10 and vs.draw_slice(slices, w, 1 - 1e-12) == 19
    assert vs.rows_for_mm(40, 1.0) == 40 and vs.rows_for_mm(40, 1.5) == 27 and vs.rows_for_mm(4, 2.0) == 2

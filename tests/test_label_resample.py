"""Label crops from thick slices: each label's signed distance, resampled, keeps tilted surfaces."""

import numpy as np
import pytest

import straighten.label_resample as label_resample
from straighten.label_resample import LabelFields


def tilted_slab(spacing, shape, angle_deg):
    """Label 20 below a plane tilted by ``angle_deg`` about axis 1, label 21 above it (a gap of 2 mm)."""
    idx = np.indices(shape).astype(np.float64) * np.asarray(spacing)[:, None, None, None]
    t = np.tan(np.radians(angle_deg))
    surface = 30.0 + t * (idx[0] - 20.0)
    labels = np.zeros(shape, np.uint8)
    labels[(idx[2] < surface) & (idx[2] > 8)] = 20
    labels[(idx[2] > surface + 2.0) & (idx[2] < 52)] = 21
    return labels, t


def surface_error(labels, t, spacing):
    """Per column (axes 0, 1) of a 1 mm grid: last z of label 20 + 0.5 mm minus the true plane."""
    below = labels == 20
    n = labels.shape[2]
    last = n - 1 - np.argmax(below[:, :, ::-1], axis=2)
    x = np.arange(labels.shape[0]) * spacing
    return (last + 0.5) * spacing - (30.0 + t * (x[:, None] - 20.0))


@pytest.mark.parametrize("angle", [15.0, 25.0])
def test_distance_resampling_follows_a_tilted_surface(angle):
    thick = (1.0, 1.0, 3.0)
    labels, t = tilted_slab(thick, (40, 12, 20), angle)
    affine = np.diag([*thick, 1.0])
    fine = np.eye(4)
    out_shape = (40, 12, 60)
    errors = {}
    for mode in ("nearest", "linear", "distance"):
        out = LabelFields(labels, affine, mode).resample(fine, out_shape)
        assert set(np.unique(out)) == {0, 20, 21}
        errors[mode] = np.abs(surface_error(out, t, 1.0)[5:35, 2:10]).mean()
    # nearest and linear put the surface on the thick slices (about 0.8 mm off on average)
    assert errors["nearest"] > 0.7 and errors["linear"] > 0.7
    assert errors["distance"] < 0.8 * errors["nearest"]


@pytest.mark.parametrize(("angle", "bound"), [(10.0, 0.40), (15.0, 0.35), (25.0, 0.30)])
def test_thick_slices_ramp_between_steps(monkeypatch, angle, bound):
    """Between a step down and a step up the surface is the straight line through them: on a plane
    crossing 3 mm slices at 10-25 deg the 1 mm crop's surface is within the crop's own half voxel
    (mean 0.25 mm) plus a little, about half the error of the distances alone (0.44-0.59 mm)."""
    labels, t = tilted_slab((1.0, 1.0, 3.0), (60, 12, 20), angle)
    errors = {}
    for ramp in (True, False):
        if not ramp:
            monkeypatch.setattr(label_resample, "RAMP_MIN_ANISOTROPY", np.inf)
        out = LabelFields(labels, np.diag([1.0, 1.0, 3.0, 1.0]), "distance").resample(np.eye(4), (60, 12, 60))
        errors[ramp] = np.abs(surface_error(out, t, 1.0)[8:52, 2:10]).mean()
    assert errors[True] < bound
    assert errors[True] < 0.7 * errors[False]


def test_a_rim_step_draws_no_ramp_into_a_flat_face(monkeypatch):
    """A face in the slices, one slice higher beyond x = 20 mm, with a bevelled rim one slice lower
    at x < 5 mm. The bevel's steps lie within RAMP_RIM_MM of the outline: they are the rim's, so
    the face between them and the real step stays half-way between its slices (z 28.5 mm, the last
    1 mm voxel inside at 28), where a ramp from the bevel to the step would pull it down."""
    labels = np.zeros((40, 24, 20), np.uint8)
    labels[2:38, 2:22, 3:10] = 20  # the face between the slice centres 27 and 30 mm
    labels[20:38, 2:22, 10] = 20  # one slice higher beyond x = 20 mm
    labels[2:5, 2:22, 9] = 0  # the bevel
    tops = []
    for rim_mm in (label_resample.RAMP_RIM_MM, 0.0):
        monkeypatch.setattr(label_resample, "RAMP_RIM_MM", rim_mm)
        out = LabelFields(labels, np.diag([1.0, 1.0, 3.0, 1.0]), "distance").resample(np.eye(4), (40, 24, 60))
        tops.append(59 - np.argmax((out == 20)[:, :, ::-1], axis=2)[:, 8:16])  # last voxel inside
    assert (tops[0][6:17] == 28).all()
    assert (tops[1][6:17] < 28).any()  # counted as a slope, the bevel would tilt the face


def test_a_surface_in_the_slices_stays_half_way():
    labels, t = tilted_slab((1.0, 1.0, 3.0), (40, 12, 20), 0.0)
    out = LabelFields(labels, np.diag([1.0, 1.0, 3.0, 1.0]), "distance").resample(np.eye(4), (40, 12, 60))
    # the plane z = 30 mm lies on a slice (outside it): half-way between 27 and 30, 1.5 mm short
    np.testing.assert_allclose(surface_error(out, t, 1.0)[5:35, 2:10], -1.5)


def test_isotropic_labels_come_back_unchanged():
    rng = np.random.default_rng(0)
    labels = np.zeros((24, 24, 24), np.uint8)
    labels[4:12, 5:20, 6:18] = 20
    labels[14:22, 3:15, 6:18] = 21
    labels[14:16, 16:20, 2:5] = 22  # a thin piece survives
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = rng.normal(size=3)
    for mode in ("linear", "distance"):
        out = LabelFields(labels, affine, mode).resample(affine, labels.shape)
        np.testing.assert_array_equal(out, labels)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="label resampling"):
        LabelFields(np.zeros((3, 3, 3), np.uint8), np.eye(4), "cubic")


def test_a_label_over_the_size_limit_falls_back_to_nearest(monkeypatch):
    import straighten.label_resample as lr

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:18, 2:18] = 20
    labels[10:18, 2:18, 2:18] = 21
    labels[0, 0, 0] = labels[19, 19, 19] = 22  # a label in two far corners: a large box
    monkeypatch.setattr(lr, "MAX_FIELD_VOXELS", 5000)
    out = LabelFields(labels, np.eye(4), "distance").resample(np.eye(4), labels.shape)
    np.testing.assert_array_equal(out, labels)

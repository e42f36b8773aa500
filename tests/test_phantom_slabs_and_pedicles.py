"""Phantom thick slices of an even number of voxels keep labels on their CT, and a fracture keeps
its posterior elements (known answers)."""

from types import SimpleNamespace

import numpy as np
import pytest

from data.phantom import Patient, Quirks, _Canvas, _fracture_for, _paint_vertebra, apply_fov_quirks
from data.phantom_anatomy import VertebraShape


def _thick(label: np.ndarray, k: int, spacing: float):
    """The thick-slice quirk (k source slices per slab) on a label volume and its CT (1000 HU inside)."""
    ct = np.where(label > 0, 1000, 0).astype(np.int16)
    vols = {
        "ct": ct,
        "mask": label,
        "body": label.copy(),
        "healthy_ct": ct.copy(),
        "healthy_mask": label.copy(),
    }
    affine = np.diag([spacing] * 3 + [1.0])
    stub = SimpleNamespace(shapes=[], full_levels=[], spacing=spacing, affine=affine)
    out, aff, cut = apply_fov_quirks(vols, stub, Quirks(slice_mm=k * spacing), affine)
    assert cut == {}
    return out, aff


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_thick_slice_labels_stay_registered_with_the_ct(k):
    """Thick slices (``--slice_mm``): each slab's label must describe the same place as its CT
    value and its affine. A slab of an even number of source slices has no middle slice; taking
    slice k // 2 put every label half a source voxel off the CT (1 mm with 2 mm voxels and 4 mm
    slices). Averaged over the object's position against the slabs, the label's centroid in world
    z must be where it was (it was, on the old code, 0.5 source voxels inferior for every even k)."""
    spacing = 2.0
    label_err, ct_err = [], []
    for phase in range(k):
        label = np.zeros((3, 3, 60), np.uint8)
        label[:, :, 12 + phase : 30 + phase] = 20
        out, aff = _thick(label, k, spacing)
        z_true = (np.flatnonzero(label[0, 0]) * spacing).mean()
        z_slab = aff[2, 2] * np.arange(out["mask"].shape[2]) + aff[2, 3]
        label_err.append(z_slab[out["mask"][0, 0] > 0].mean() - z_true)
        w = out["ct"][0, 0].astype(np.float64)
        ct_err.append(z_slab @ w / w.sum() - z_true)
        np.testing.assert_array_equal(out["healthy_mask"], out["mask"])
        np.testing.assert_allclose(np.diag(aff)[:3], [spacing, spacing, k * spacing])
    assert abs(np.mean(ct_err)) < 0.05 * spacing
    assert abs(np.mean(label_err)) < 0.05 * spacing, np.mean(label_err)


def _crush_canvas(spacing: float = 1.0):
    """A lumbar-sized vertebra with a severe crush fracture, painted healthy then fractured as
    :func:`data.phantom.render` paints it (posterior elements in the healthy pass only)."""
    shape = VertebraShape(vid=20, centre=np.zeros(3), axes=np.eye(3), H=25.0, A=16.0, W=21.0)
    _fracture_for(shape, 0.5, "crush")
    box = shape.local_box()
    shape_vox = tuple(int(np.ceil((hi - lo) / spacing)) + 1 for lo, hi in box)
    ints = {"cortical": 850.0, "cancellous": 200.0, "texture": 0.0, "posterior": 450.0, "noise": 0.0}
    patient = Patient("p", spacing, [shape], [20], [], box[:, 0].copy(), shape_vox, {}, {}, ints, [])
    canvas = _Canvas(patient)
    _paint_vertebra(canvas, shape, fractured=False)
    healthy = (canvas.labels.copy(), canvas.body.copy())
    _paint_vertebra(canvas, shape, fractured=True, posterior=False)
    sl, h, a, r = canvas.local(shape.centre, shape.axes, box)
    return shape, canvas, healthy, shape.posterior(h, a, r)


def test_a_fracture_keeps_the_posterior_elements():
    """A compression fracture collapses the body; the pedicles, which reach into the body's
    posterior-superior corner, stay (the fractured pass does not redraw the posterior elements,
    by design). The old code turned every voxel of the healthy body the fractured body lost into
    disc, pedicle voxels included: a crush fracture lost 37-93 mm3 of its pedicles (label 0,
    disc HU) in a default phantom at 1 mm."""
    shape, canvas, (healthy_lab, healthy_body), post = _crush_canvas()
    assert (post & healthy_body).sum() > 0  # the pedicles do reach into the healthy body
    lost = post & (healthy_lab == 20) & (canvas.labels != 20)
    assert lost.sum() == 0, f"{lost.sum()} posterior-element voxels erased by the fracture"
    # where the body collapsed under them they are posterior elements (label, bone HU, not body)
    kept = post & healthy_body & ~canvas.body
    assert kept.sum() > 20
    assert (canvas.labels[kept] == 20).all() and (canvas.hu[kept] >= 400).all()
    # the body itself still gives up its lost height to disc tissue
    gone = healthy_body & ~canvas.body & ~post
    assert gone.sum() > 1000 and (canvas.labels[gone] == 0).all()
    assert ((canvas.hu[gone] >= 70) & (canvas.hu[gone] <= 100)).all()


def test_thick_slices_of_an_odd_count_are_unchanged():
    """The fix for even slabs leaves odd ones (the documented 1 x 1 x 3 mm) byte for byte."""
    rng = np.random.default_rng(0)
    label = (rng.random((4, 5, 31)) > 0.5).astype(np.uint8) * 21
    out, aff = _thick(label, 3, 1.0)
    np.testing.assert_array_equal(out["mask"], label[:, :, 1:30:3])
    ct = np.where(label > 0, 1000, 0)[:, :, :30].reshape(4, 5, 10, 3).mean(axis=3)
    np.testing.assert_array_equal(out["ct"], np.rint(ct).astype(np.int16))
    assert aff[2, 3] == pytest.approx(1.0) and aff[2, 2] == pytest.approx(3.0)

"""The crop's anterior-posterior axis from the vertebra's own anatomy, and the axial rotation quirk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.nifti_io import Volume, load_mask, save_nifti
from straighten.centroids import label_centroids, write_centroids
from straighten.curve import crop_affine, fit_spine_curve, turn_deg
from straighten.patient import StraightenOptions, anatomical_ap, straighten_patient

STEP_MM = 2.0
INFERIOR = np.array([0.0, 0.0, -1.0])
# centres (world mm) of three stacked vertebrae along z, 40 mm apart
CENTRES = [np.array([0.0, 0.0, z]) for z in (40.0, 0.0, -40.0)]


def _grid(shape=(90, 100, 60)) -> tuple[np.ndarray, np.ndarray]:
    """An axis-aligned 2 mm affine centred on the world origin, and its voxels' world positions."""
    affine = np.diag([STEP_MM] * 3 + [1.0])
    affine[:3, 3] = -STEP_MM * (np.asarray(shape) - 1) / 2
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return affine, idx * STEP_MM + affine[:3, 3]


def _vertebra(world: np.ndarray, centre: np.ndarray, turn: float, posterior: bool = True) -> np.ndarray:
    """A box body, and (``posterior``) an arch around a canal with a spinous block and two
    transverse processes of unequal length, turned by ``turn`` degrees about the inferior axis
    (positive: the posterior towards the left, -x in RAS)."""
    t = np.radians(turn)
    ap = np.array([-np.sin(t), -np.cos(t), 0.0])  # the scanner's posterior (-y) turned
    lr = np.cross(INFERIOR, ap)
    d = world - centre
    h, a, r = d @ INFERIOR, d @ ap, d @ lr
    body = (np.abs(h) <= 12) & (np.abs(a) <= 15) & (np.abs(r) <= 20)
    if not posterior:
        return body
    ring = np.hypot(a - 26, r)
    arch = (ring >= 8) & (ring <= 13) & (np.abs(h) <= 10) & (a >= 13)
    spinous = (a >= 36) & (a <= 62) & (np.abs(r) <= 3) & (np.abs(h) <= 6)
    processes = (
        (a >= 20) & (a <= 26) & (np.abs(h) <= 4) & (((r >= 12) & (r <= 48)) | ((r <= -12) & (r >= -28)))
    )
    return body | arch | spinous | processes


def _spine(turns: tuple[float, ...], posterior: bool = True) -> Volume:
    affine, world = _grid()
    mask = np.zeros(world.shape[:3], dtype=np.uint8)
    for vid, centre, turn in zip((20, 21, 22), CENTRES, turns, strict=True):
        mask[_vertebra(world, centre, turn, posterior)] = vid
    return Volume(mask, affine)


def _curve():
    return fit_spine_curve(np.array(CENTRES), STEP_MM, 40.0, degree=1)


@pytest.mark.parametrize("turn", [-30.0, 0.0, 12.0, 35.0])
def test_anatomical_ap_follows_a_vertebra_turned_about_the_long_axis(turn):
    """Box body, arch and processes turned by a known angle: the crop's AP axis is within 2 deg."""
    mask, curve = _spine((0.0, turn, 0.0)), _curve()
    row = curve.project(CENTRES[1])
    got = anatomical_ap(mask, 21, curve, row)
    assert got.ap is not None and got.landmark == "canal", got.reason
    assert got.turn_deg == pytest.approx(turn, abs=2.0)
    aff = crop_affine(curve, row, (32, 32, 32), got.ap)
    axes = aff[:3, :3] / STEP_MM
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-9) and np.linalg.det(axes) > 0
    t = np.radians(turn)
    truth = np.array([-np.sin(t), -np.cos(t), 0.0])
    assert np.degrees(np.arccos(np.clip(axes[:, 1] @ truth, -1, 1))) < 2.0
    assert turn_deg(INFERIOR, np.array([0.0, -1.0, 0.0]), axes[:, 1]) == pytest.approx(turn, abs=2.0)


def test_a_label_of_the_body_alone_keeps_the_scanner_frame_and_says_why():
    mask, curve = _spine((20.0, 20.0, 20.0), posterior=False), _curve()
    got = anatomical_ap(mask, 21, curve, curve.project(CENTRES[1]))
    assert got.ap is None and got.landmark == "scanner" and got.turn_deg == 0.0
    assert "no posterior elements" in got.reason


def _straighten(tmp_path, mask: Volume, crop_ap: str) -> dict:
    pid = "syn"
    raw = tmp_path / "raw" / pid
    save_nifti(raw / f"{pid}_msk.nii.gz", mask.array, mask.affine)
    write_centroids(raw / f"{pid}.json", label_centroids(mask.array))
    opt = StraightenOptions(
        spacing_mm=STEP_MM, crop_mm=(80.0, 80.0, 64.0), labels_only=True, overwrite=True, crop_ap=crop_ap
    )
    straighten_patient(tmp_path, pid, opt)
    return json.loads((tmp_path / "straightened" / "curve" / f"{pid}.json").read_text())


def test_straightening_turns_each_crop_to_its_vertebra_and_records_the_turn(tmp_path):
    """End to end: the middle vertebra turned 25 deg gets a crop turned 25 deg (its affine and the
    curve json say so); ``scanner`` keeps the previous frame; a body-only label falls back."""
    record = _straighten(tmp_path, _spine((0.0, 25.0, -10.0)), "anatomy")
    assert record["crop_ap"] == "anatomy"
    turns = {v: c["ap_turn_deg"] for v, c in record["crops"].items()}
    assert turns["21"] == pytest.approx(25.0, abs=2.0) and record["crops"]["21"]["ap_from"] == "canal"
    crop = load_mask(tmp_path / "straightened" / "label" / "syn_21.nii.gz")
    ap = crop.affine[:3, 1] / np.linalg.norm(crop.affine[:3, 1])
    assert turn_deg(INFERIOR, np.array([0.0, -1.0, 0.0]), ap) == pytest.approx(25.0, abs=2.0)

    record = _straighten(tmp_path, _spine((0.0, 25.0, -10.0)), "scanner")
    assert {c["ap_from"] for c in record["crops"].values()} == {"scanner"}
    assert all(c["ap_turn_deg"] == 0.0 for c in record["crops"].values())

    record = _straighten(tmp_path, _spine((0.0, 25.0, -10.0), posterior=False), "anatomy")
    assert all(
        c["ap_from"] == "scanner" and "no posterior elements" in c["ap_reason"]
        for c in record["crops"].values()
    )


def test_axial_rotation_quirk_turns_the_anatomy_and_keeps_its_truth(tmp_path):
    """The same patient with and without the quirk: identical truth heights; the geometry json's
    axes turned by the patient's turn plus each vertebra's own; each true body (its label in the
    truth body mask) centred where the turned geometry puts it and of the same volume."""
    from data.phantom import Quirks, generate

    rows0 = generate(tmp_path / "a", 1, 2, 2.0, levels="L1-L2", fracture_fraction=1.0, progress=False)
    rows = generate(
        tmp_path / "b", 1, 2, 2.0, levels="L1-L2", fracture_fraction=1.0, progress=False,
        quirks=Quirks(axial_rotation_deg=30.0),
    )  # fmt: skip
    heights = [k for k in rows0[0] if k.endswith("_mm")]
    assert [[r[k] for k in heights] for r in rows] == [[r[k] for k in heights] for r in rows0]
    assert [r["grade"] for r in rows] == [r["grade"] for r in rows0]

    truth = {k: tmp_path / k / "truth" / "phantom000" for k in "ab"}
    g0, g = (json.loads((truth[k] / "phantom000_geometry.json").read_text()) for k in "ab")
    assert g0["patient_turn_deg"] == 0.0 and 15.0 <= abs(g["patient_turn_deg"]) <= 30.0
    body0, body = (load_mask(truth[k] / "phantom000_body_msk.nii.gz") for k in "ab")

    def body_offset(mask: Volume, vertebra: dict) -> np.ndarray:
        """The true body's centroid (world mm) from the vertebra's centre in the geometry json."""
        idx = np.argwhere(mask.array == vertebra["vid"])
        return (mask.affine @ np.r_[idx.mean(axis=0), 1.0])[:3] - vertebra["centre_mm"]

    for v0, v in zip(g0["vertebrae"], g["vertebrae"], strict=True):
        own = v["axial_rotation_deg"]
        assert abs(own) <= 7.5 and v0["axial_rotation_deg"] == 0.0
        height, ap0, ap = (np.array(x) for x in (v["axes"]["height"], v0["axes"]["ap"], v["axes"]["ap"]))
        # two turns about nearly parallel axes (the long axis, the body's height axis) add up
        assert turn_deg(height, ap0, ap) == pytest.approx(g["patient_turn_deg"] + own, abs=3.0)
        if not v["full"]:
            continue
        # the image turned with the geometry: the true body lies where the turned frame puts it
        rot, rot0 = (np.stack([x["axes"][k] for k in ("height", "ap", "lr")]).T for x in (v, v0))
        expected = rot @ rot0.T @ body_offset(body0, v0)
        assert np.linalg.norm(body_offset(body, v) - expected) < 1.0
        n, n0 = ((m.array == v["vid"]).sum() for m in (body, body0))
        assert n == pytest.approx(n0, rel=0.03)


def test_patient_posterior_turns_with_the_patient():
    from straighten.curve import POSTERIOR, patient_posterior

    mask, curve = _spine((20.0, 24.0, 22.0)), _curve()
    posterior, turn = patient_posterior(mask, curve, dict(zip((20, 21, 22), CENTRES, strict=True)))
    assert turn == pytest.approx(22.0, abs=2.0)
    assert turn_deg(INFERIOR, POSTERIOR, posterior) == pytest.approx(turn, abs=1e-6)
    body_only = _spine((20.0, 24.0, 22.0), posterior=False)
    assert patient_posterior(body_only, curve, dict(zip((20, 21, 22), CENTRES, strict=True)))[1] == 0.0


@pytest.mark.parametrize(
    "turns, flagged_by_scanner_frame", [((30.0, 30.0, 30.0), {20, 21, 22}), ((0.0, 30.0, 0.0), None)]
)
def test_a_turned_vertebra_in_a_narrow_field_of_view_keeps_its_body_whole(
    monkeypatch, turns, flagged_by_scanner_frame
):
    """A patient turned 30 deg, or one vertebra turned 30 deg against its neighbours (a rotated
    scoliotic one): an 80 mm lateral field of view cuts a transverse process, not a body, and no
    vertebra is flagged. In the scanner's frame alone, the turned patient's processes stay with
    the bodies: flagged."""
    import straighten.centroids as centroids_module
    import straighten.curve as curve_module

    mask = _spine(turns)
    x = mask.affine[0, 3] + STEP_MM * np.arange(mask.array.shape[0])
    keep = np.flatnonzero(np.abs(x) <= 40.0)
    affine = mask.affine.copy()
    affine[0, 3] = x[keep[0]]
    cut = np.ascontiguousarray(mask.array[keep[0] : keep[-1] + 1])
    assert (mask.array == 21).sum() > (cut == 21).sum()  # the long process is cut
    assert centroids_module.body_cut_by_fov(cut, affine, [20, 21, 22]) == {}
    if flagged_by_scanner_frame is None:
        return
    monkeypatch.setattr(curve_module, "patient_posterior", lambda *a, **k: (curve_module.POSTERIOR, 0.0))
    monkeypatch.setattr(centroids_module, "body_cut_in_own_frame", lambda *a, **k: True)
    assert set(centroids_module.body_cut_by_fov(cut, affine, [20, 21, 22])) == flagged_by_scanner_frame

"""Iterative 3D synthesis: neighbour order, batching, the three planes, reruns and bad inputs."""

from __future__ import annotations

import argparse
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import eval_3d_sagittal_twostage as synth_cli
from data.crops import CropGeometry, CropStore
from models.composite import compose
from models.synthesis import SynthesisSettings, auto_batch_slices, fuse_planes, step_order, synthesise_crop
from options.base_options import save_options
from tests import conftest
from tests.conftest import write_nifti
from tests.fixtures.synth_model import SynthModel
from util.atomic import write_json

SPACING_MM = 2.0
SHAPE = (64, 32, 16)  # rows (height), AP, LR
# VerSe id -> first and last + 1 row of its body; T11, T12, L1, L2 at 2 mm, 3-row discs.
BODIES = {18: (2, 12), 19: (15, 25), 20: (28, 38), 21: (41, 51)}
AP, LR = (8, 24), (3, 13)
TARGETS = (19, 20, 21)
FAKE_MODEL = "tests.fixtures.synth_model"


def phantom_crop(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 CT and labels of one tiny straightened crop; L1 (20) has an anterior wedge."""
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    for vid, (r0, r1) in BODIES.items():
        label[r0:r1, AP[0] : AP[1], LR[0] : LR[1]] = vid
    label[28:32, AP[0] : AP[0] + 6, LR[0] : LR[1]] = 0  # the fracture: 4 rows lost anteriorly
    ct = np.clip(40 + rng.normal(0, 5, SHAPE), 0, 255)
    ct[label > 0] = 180 + rng.normal(0, 10, int((label > 0).sum()))
    return np.clip(ct, 0, 255).astype(np.uint8), label


def write_dataset(root) -> dict:
    """CT/, label/ and heatmap/ crops of three vertebrae, and a split file."""
    ct, label = phantom_crop()
    affine = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.5)
    for vid in TARGETS:
        write_nifti(root / "straightened" / "CT" / f"p1_{vid}.nii.gz", ct, affine)
        write_nifti(root / "straightened" / "label" / f"p1_{vid}.nii.gz", label, affine)
        cam = np.random.default_rng(vid).random(SHAPE).astype(np.float32)
        write_nifti(root / "heatmap" / f"p1_{vid}.nii.gz", cam, affine)
    split = {"train": {"p1_19": 0, "p1_21": 0}, "val": {}, "test": {"p1_20": 2}}
    (root / "vertebra_data.json").write_text(json.dumps(split))
    return {"ct": ct, "label": label, "affine": affine}


def write_run(checkpoints, name: str, plane: str, seed: int = 0) -> None:
    """A randomly initialised fake run saved the way train.py saves one (opt.json + checkpoint)."""
    opt = argparse.Namespace(
        model=FAKE_MODEL,
        name=name,
        checkpoints_dir=str(checkpoints),
        gpu_ids=[],
        isTrain=False,
        plane=plane,
        mask_height_mm=40.0,
        seed=seed,
        dataroot=None,
        vertebra_json=None,
        cam_folder=None,
        epoch="latest",
        load_iter=0,
    )
    model = SynthModel(opt)
    model.save_networks("latest")
    save_options(opt, checkpoints / name / "opt.json")


def write_healthivert_run(checkpoints, name: str, plane: str, root) -> None:
    """A randomly initialised HealthiVert generator saved with its parsed options (as train.py does)."""
    from models import create_model
    from options.test_options import TestOptions

    argv = ["--model", "healthivert", "--dataset_mode", f"aligned_{plane}", "--name", name]
    argv += ["--checkpoints_dir", str(checkpoints), "--gpu_ids", "-1", "--dataroot", str(root)]
    opt = TestOptions().parse(argv)
    torch.manual_seed(0)
    create_model(opt).save_networks("latest")
    save_options(opt, checkpoints / name / "opt.json")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run far faster on one thread on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_data")
    info = write_dataset(root)
    checkpoints = root / "checkpoints"
    write_run(checkpoints, "hv", "sagittal", seed=1)
    write_run(checkpoints, "hv_cor", "coronal", seed=2)
    for plane in ("sagittal", "coronal"):
        write_healthivert_run(checkpoints, f"real_{plane}", plane, root / "straightened")
    return root, checkpoints, info


def cli_args(root, checkpoints, out, *extra) -> list[str]:
    return [
        "--dataroot",
        str(root / "straightened"),
        "--vertebra_json",
        str(root / "vertebra_data.json"),
        "--name",
        "hv",
        "--checkpoints_dir",
        str(checkpoints),
        "--output_dir",
        str(out),
        "--gpu_ids",
        "-1",
        *extra,
    ]


def fake_model(plane: str = "sagittal", seed: int = 1) -> SynthModel:
    return SynthModel(argparse.Namespace(gpu_ids=[], checkpoints_dir=".", name="x", seed=seed, plane=plane))


def settings(batch_slices: int = 0, width: int | None = SHAPE[1]) -> SynthesisSettings:
    return SynthesisSettings(
        hole_rows=20,
        min_area_px=200 / SPACING_MM**2,
        min_component_px=50 / SPACING_MM**2,
        batch_slices=batch_slices,
        width=width,
        row_spacing_mm=SPACING_MM,
    )


def assert_same_ct(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float noise: each step rounds to uint8, so a tie may round either way."""
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert diff.max() <= 1.0 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


# --- pure functions ---------------------------------------------------------------------------
def test_step_order_walks_the_labels_present():
    assert step_order(20, [18, 19, 20, 21]) == [19, 21, 20]
    assert step_order(20, [19, 28, 20, 21]) == [28, 21, 20]  # T13 between T12 and L1
    assert step_order(24, [23, 24, 26]) == [23, 24]  # the sacrum is never synthesised
    assert step_order(20, [20]) == [20]
    assert step_order(26, [24, 26]) == [26]  # not a vertebra: no anatomical neighbours
    # a neighbour cut by the scan's edge stays as it is; the other side is still synthesised
    assert step_order(20, [18, 19, 20, 21], keep={19}) == [21, 20]
    assert step_order(20, [18, 19, 20, 21], keep=[19, 21]) == [20]
    # --neighbours real: the target alone, whatever the labels around it
    assert step_order(20, [18, 19, 20, 21], neighbours_mode="real") == [20]
    assert step_order(20, [19, 28, 20, 21], keep={19}, neighbours_mode="real") == [20]
    with pytest.raises(ValueError, match="neighbours_mode"):
        step_order(20, [19, 20, 21], neighbours_mode="both")


def test_a_neighbour_cut_by_the_scan_is_left_as_it_is(tmp_path, capsys):
    """The curve json lists T12 (19) as cut: the synthesis of L1 (20) does not replace it (its
    pseudo-healthy version would be a whole body where the scan holds a part, pushing L1 down),
    and a rerun into outputs made while T12 was replaced makes them again."""
    root = tmp_path / "data"
    write_dataset(root)
    checkpoints = root / "checkpoints"
    write_run(checkpoints, "hv", "sagittal", seed=1)
    out_all, out_kept = tmp_path / "all", tmp_path / "kept"
    args = ("--vertebrae", "p1_20")
    assert synth_cli.main(cli_args(root, checkpoints, out_all, *args)) == 0
    assert "3 forward passes" in capsys.readouterr().out  # T12, L2, then L1: one pass each
    write_json(root / "straightened" / "curve" / "p1.json", {"pid": "p1", "not_measurable": {"19": "cut"}})
    assert synth_cli.main(cli_args(root, checkpoints, out_kept, *args)) == 0
    assert "2 forward passes" in capsys.readouterr().out  # L2, then L1
    read = lambda out: np.asarray(nib.load(str(out / "CT_fake" / "p1_20.nii.gz")).dataobj)  # noqa: E731
    assert not np.array_equal(read(out_all), read(out_kept))
    assert synth_cli.main(cli_args(root, checkpoints, out_all, *args)) == 0
    assert "made from other crops or attention maps" in capsys.readouterr().out
    assert np.array_equal(read(out_all), read(out_kept))


def test_real_neighbours_are_one_pass_per_crop_and_another_synthesis(tmp_path, capsys):
    """``--neighbours real`` synthesises the target alone (one pass for L1 instead of three), and
    its outputs are not taken for those of the reference's order (nor the other way round)."""
    root = tmp_path / "data"
    write_dataset(root)
    checkpoints = root / "checkpoints"
    write_run(checkpoints, "hv", "sagittal", seed=1)
    args = ("--vertebrae", "p1_20")
    out = tmp_path / "out"
    assert synth_cli.main(cli_args(root, checkpoints, out, *args, "--neighbours", "real")) == 0
    assert "1 forward passes" in capsys.readouterr().out
    assert synth_cli.main(cli_args(root, checkpoints, out, *args, "--neighbours", "real")) == 0
    assert "synthesised 0 vertebrae" in capsys.readouterr().out  # finished: skipped
    assert synth_cli.main(cli_args(root, checkpoints, out, *args)) == 2
    assert "made by another synthesis" in capsys.readouterr().err
    ordered = tmp_path / "ordered"
    assert synth_cli.main(cli_args(root, checkpoints, ordered, *args)) == 0
    assert "3 forward passes" in capsys.readouterr().out
    read = lambda o: np.asarray(nib.load(str(o / "CT_fake" / "p1_20.nii.gz")).dataobj)  # noqa: E731
    assert not np.array_equal(read(out), read(ordered))


def test_steps_run_upper_then_lower_then_target_each_on_the_previous_output():
    ct, label = phantom_crop()
    calls = []

    def recording(batch):
        calls.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        x1, x2 = batch["x1"].reshape(-1), batch["x2"].reshape(-1)
        marker = torch.ones_like(batch["ct"])  # the synthesised rows become 255
        rows = x2 - x1  # insert exactly the observed height: nothing moves
        from models.composite import compose

        out_ct = compose(marker, batch["ct"], x1, x2, rows, -1.0)
        seg = compose(torch.ones_like(marker), torch.zeros_like(marker), x1, x2, rows, 0)
        return {"ct": out_ct, "seg": seg, "rows": rows, "top": x1}

    result = synthesise_crop(ct, label, None, 20, "sagittal", recording, settings())
    assert len(calls) == 3  # one batched pass per step
    first_rows = [int(c["x1"].reshape(-1)[0]) for c in calls]
    assert first_rows == [BODIES[19][0], BODIES[21][0], BODIES[20][0]]  # upper, lower, target
    upper_band = slice(*BODIES[19])
    lower_band = slice(*BODIES[21])
    assert torch.all(calls[1]["ct"][:, 0, upper_band] == 1.0)  # step 2 saw step 1's output
    assert torch.all(calls[2]["ct"][:, 0, upper_band] == 1.0)
    assert torch.all(calls[2]["ct"][:, 0, lower_band] == 1.0)  # step 3 saw step 2's output
    n_slices = LR[1] - LR[0]
    assert all(c["ct"].shape[0] == n_slices for c in calls)  # every slice of the extent
    assert result.steps == {19: n_slices, 21: n_slices, 20: n_slices}
    assert np.all(result.ct[upper_band, :, LR[0] : LR[1]] == 255)


def test_with_real_neighbours_only_the_target_is_synthesised_between_them():
    """``neighbours_mode="real"``: one step, on the crop as the scan has it; the neighbours are
    moved by the target's composite, never redrawn."""
    ct, label = phantom_crop()
    calls = []

    def recording(batch):
        calls.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return fake_model().synthesise(batch)

    result = synthesise_crop(ct, label, None, 20, "sagittal", recording, settings(), neighbours_mode="real")
    assert len(calls) == 1 and int(calls[0]["x1"].reshape(-1)[0]) == BODIES[20][0]
    # the step saw the real neighbours: the same input as the target step of a crop with none to replace
    alone = synthesise_crop(ct, label, None, 20, "sagittal", recording, settings(), keep={19, 21})
    torch.testing.assert_close(calls[1]["ct"], calls[0]["ct"])
    np.testing.assert_array_equal(result.ct, alone.ct)
    np.testing.assert_array_equal(result.label, alone.label)
    n_slices = LR[1] - LR[0]
    assert result.steps == {20: n_slices} and result.forward_passes == 1
    for vid in (19, 21):  # moved by the rows the target gains, not replaced: the same voxels
        assert (result.label == vid).sum() == (label == vid).sum()


def test_a_neighbour_too_small_on_a_slice_is_left_alone():
    ct, label = phantom_crop()
    label[BODIES[21][0] : BODIES[21][1], :, LR[0]] = 0
    label[BODIES[21][0] : BODIES[21][0] + 2, AP[0] : AP[0] + 4, LR[0]] = 21  # 8 px = 32 mm2 < 200 mm2
    model = fake_model()
    result = synthesise_crop(ct, label, None, 20, "sagittal", model.synthesise, settings())
    n_slices = LR[1] - LR[0]
    assert result.steps == {19: n_slices, 21: n_slices - 1, 20: n_slices}


def test_the_target_is_synthesised_on_slices_too_small_for_a_neighbour():
    ct, label = phantom_crop()
    edge = LR[0]
    label[BODIES[20][0] : BODIES[20][1], :, edge] = 0
    label[32:38, AP[0] : AP[0] + 5, edge] = 20  # 30 px = 120 mm2: under 200 mm2, over 50 mm2
    result = synthesise_crop(ct, label, None, 20, "sagittal", fake_model().synthesise, settings())
    assert result.steps[20] == LR[1] - LR[0]
    assert (result.label[..., edge] == 20).sum() > 30


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_batched_equals_one_slice_at_a_time(plane):
    ct, label = phantom_crop()
    cam = np.random.default_rng(3).random(SHAPE).astype(np.float32)
    model = fake_model(plane)
    batched = synthesise_crop(ct, label, cam, 20, plane, model.synthesise, settings(0))
    single = synthesise_crop(ct, label, cam, 20, plane, model.synthesise, settings(1))
    chunks = synthesise_crop(ct, label, cam, 20, plane, model.synthesise, settings(4))
    assert batched.forward_passes == 3
    assert single.forward_passes == sum(single.steps.values())
    for other in (single, chunks):
        assert_same_ct(other.ct, batched.ct)
        np.testing.assert_array_equal(other.label, batched.label)
        np.testing.assert_allclose(other.target_prob, batched.target_prob, atol=1e-5)


def test_every_slice_of_the_target_is_synthesised_and_others_are_copied():
    ct, label = phantom_crop()
    result = synthesise_crop(ct, label, None, 20, "sagittal", fake_model().synthesise, settings())
    np.testing.assert_array_equal(result.slices["sagittal"], np.arange(*LR))  # the whole extent, not 80 %
    outside = [z for z in range(SHAPE[2]) if not LR[0] <= z < LR[1]]
    np.testing.assert_array_equal(result.ct[..., outside], ct[..., outside])
    np.testing.assert_array_equal(result.label[..., outside], label[..., outside])
    for z in range(*LR):
        rows = np.flatnonzero((result.label[..., z] == 20).any(axis=1))
        assert rows.size >= BODIES[20][1] - BODIES[20][0]  # never shorter than observed
        # the synthesised body spans its columns with no anterior wedge left
        cols = np.flatnonzero((result.label[..., z] == 20).any(axis=0))
        np.testing.assert_array_equal(cols, np.arange(*AP))


def test_fusion_averages_ct_and_thresholds_the_mean_probability():
    ct, label = phantom_crop()
    sag = synthesise_crop(ct, label, None, 20, "sagittal", fake_model("sagittal", 1).synthesise, settings())
    cor = synthesise_crop(ct, label, None, 20, "coronal", fake_model("coronal", 2).synthesise, settings())
    fused = fuse_planes(sag, cor, 20)
    np.testing.assert_allclose(fused.ct, 0.5 * (sag.ct + cor.ct))
    np.testing.assert_array_equal(fused.label == 20, 0.5 * (sag.target_prob + cor.target_prob) > 0.5)
    assert set(np.unique(fused.label)) <= {0, 18, 19, 20, 21}
    np.testing.assert_array_equal(fused.slices["sagittal"], np.arange(*LR))  # each plane its own axis
    np.testing.assert_array_equal(fused.slices["coronal"], np.arange(*AP))


# --- the script ---------------------------------------------------------------------------------
@pytest.mark.parametrize("plane", ["sagittal", "coronal", "fusion"])
def test_script_writes_volumes_on_the_crop_grid(dataset, tmp_path, plane, capsys):
    root, checkpoints, info = dataset
    extra = ["--plane", plane]
    if plane == "coronal":
        extra = ["--plane", plane, "--name", "hv_cor"]
    if plane == "fusion":
        extra += ["--name_coronal", "hv_cor"]
    argv = cli_args(root, checkpoints, tmp_path, *extra)
    if plane == "coronal":
        argv.remove("hv")
        argv.remove("--name")
    assert synth_cli.main(argv) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("synthesised 3 vertebrae") and "s/vertebra" in summary
    for vid in TARGETS:
        ct_img = nib.load(str(tmp_path / "CT_fake" / f"p1_{vid}.nii.gz"))
        lab_img = nib.load(str(tmp_path / "label_fake" / f"p1_{vid}.nii.gz"))
        for img in (ct_img, lab_img):
            assert img.shape == SHAPE
            assert img.get_data_dtype() == np.uint8
            np.testing.assert_allclose(img.affine, info["affine"])
        fake_label, fake_ct = np.asarray(lab_img.dataobj), np.asarray(ct_img.dataobj)
        axes = (2,) if plane == "sagittal" else (1,) if plane == "coronal" else (1, 2)
        for axis, (z0, z1) in ((1, AP), (2, LR)):
            if axis not in axes:
                continue
            through = np.moveaxis(fake_label == vid, axis, 0).any(axis=(1, 2))
            assert through[z0:z1].all()  # every slice of the extent holds the synthesised target
        if plane != "fusion":  # slices not through the target are the input's
            axis, (z0, z1) = (2, LR) if plane == "sagittal" else (1, AP)
            outside = [z for z in range(SHAPE[axis]) if not z0 <= z < z1]
            np.testing.assert_array_equal(np.take(fake_ct, outside, axis), np.take(info["ct"], outside, axis))


@pytest.mark.parametrize("plane", [pytest.param("sagittal", marks=pytest.mark.slow), "fusion"])
def test_healthivert_run_writes_volumes_on_the_crop_grid(dataset, tmp_path, plane, capsys):
    root, checkpoints, info = dataset
    name = "real_coronal" if plane == "coronal" else "real_sagittal"
    argv = cli_args(root, checkpoints, tmp_path, "--plane", plane, "--vertebrae", "p1_20")
    argv[argv.index("--name") + 1] = name
    if plane == "fusion":
        argv += ["--name_coronal", "real_coronal"]
    assert synth_cli.main(argv) == 0, capsys.readouterr().err
    assert "synthesised 1 vertebrae" in capsys.readouterr().out
    for folder in ("CT_fake", "label_fake"):
        img = nib.load(str(tmp_path / folder / "p1_20.nii.gz"))
        assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, info["affine"])
    fake_ct = np.asarray(nib.load(str(tmp_path / "CT_fake" / "p1_20.nii.gz")).dataobj)
    assert (fake_ct != info["ct"]).any()


@pytest.mark.parametrize("plane", ["sagittal", pytest.param("coronal", marks=pytest.mark.slow)])
def test_healthivert_batched_equals_one_slice_at_a_time(dataset, plane):
    _, checkpoints, _ = dataset
    run = synth_cli.load_run(str(checkpoints), f"real_{plane}", "latest", [])
    ct, label = phantom_crop()
    batched = synthesise_crop(ct, label, None, 20, plane, run.synthesise, settings(0))
    single = synthesise_crop(ct, label, None, 20, plane, run.synthesise, settings(1))
    assert batched.forward_passes == 3 and single.forward_passes == sum(single.steps.values()) > 3
    assert_same_ct(single.ct, batched.ct)
    assert (single.label != batched.label).mean() < 1e-3
    np.testing.assert_allclose(single.target_prob, batched.target_prob, atol=1e-4)


def test_reruns_skip_finished_crops_unless_overwrite(dataset, tmp_path, capsys):
    root, checkpoints, _ = dataset
    argv = cli_args(root, checkpoints, tmp_path, "--phase", "train")
    assert synth_cli.main(argv) == 0
    assert "synthesised 2 vertebrae" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "CT_fake")) == ["p1_19.nii.gz", "p1_21.nii.gz"]
    stamp = (tmp_path / "CT_fake" / "p1_19.nii.gz").stat().st_mtime_ns
    assert synth_cli.main(argv) == 0
    assert "synthesised 0 vertebrae" in capsys.readouterr().out
    assert (tmp_path / "CT_fake" / "p1_19.nii.gz").stat().st_mtime_ns == stamp
    assert synth_cli.main([*argv, "--overwrite", "--shard", "0/1"]) == 0
    assert "synthesised 2 vertebrae" in capsys.readouterr().out


def test_an_implausible_synthesis_is_warned_about(dataset, tmp_path, capsys, monkeypatch):
    """A run that draws a sliver of the target (one on scans unlike its training data) is named,
    per vertebra and in a closing count; the volumes are still written."""
    root, checkpoints, _ = dataset
    real = synth_cli.synthesise_one

    def sliver(crop, runs, cam, opt, keep=()):
        result = real(crop, runs, cam, opt, keep)
        if crop.vid == 21:
            target = np.argwhere(result.label == crop.vid)
            result.label[result.label == crop.vid] = 0
            result.label[tuple(target[0])] = crop.vid
        return result

    monkeypatch.setattr(synth_cli, "synthesise_one", sliver)
    assert synth_cli.main(cli_args(root, checkpoints, tmp_path, "--phase", "train")) == 0
    out = capsys.readouterr().out
    assert "warning: p1_21: implausible synthesis: " in out and "p1_19:" not in out
    assert "warning: 1 of 2 synthesised vertebrae are not plausible healthy twins" in out
    assert (tmp_path / "label_fake" / "p1_21.nii.gz").exists()


def test_crops_unlike_the_runs_training_crops_are_warned_about(dataset, tmp_path, capsys):
    """train.py records its crops' grid (train_crops.json); crops of another field of view or voxel
    size get one warning naming both grids and the straightening flags that match the run."""
    root, checkpoints, _ = dataset
    runs = tmp_path / "runs"
    shutil.copytree(checkpoints / "hv", runs / "hv")
    argv = cli_args(root, runs, tmp_path / "out", "--vertebrae", "p1_20")
    argv[argv.index("--checkpoints_dir") + 1] = str(runs)
    assert synth_cli.main(argv) == 0  # a run without the record is not checked
    assert "trained on" not in capsys.readouterr().out
    here = CropStore(root / "straightened").geometry("p1_20")
    other = CropGeometry(tuple(n // 2 for n in here.shape), tuple(2 * s for s in here.spacing_mm))
    write_json(runs / "hv" / "train_crops.json", {"geometries": [{**other.as_dict(), "crops": 5}]})
    assert synth_cli.main([*argv, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"warning: 1 crop(s) here are {here.describe()}; run 'hv' was trained on {other.describe()}" in out
    assert f"--spacing_mm {other.spacing_mm[0]:g} to match" in out
    write_json(runs / "hv" / "train_crops.json", {"geometries": [{**here.as_dict(), "crops": 5}]})
    assert synth_cli.main([*argv, "--overwrite"]) == 0
    assert "trained on" not in capsys.readouterr().out
    (runs / "hv" / "train_crops.json").write_text('{"geometries": [{"shape": [1]}]}')
    assert synth_cli.main([*argv, "--overwrite"]) == 0  # the record is advisory
    assert "train_crops.json: not a list of crop grids" in capsys.readouterr().out


def test_test_script_warns_about_crops_unlike_the_training_crops(dataset, tmp_path, capsys):
    """test.py checks the run's train_crops.json against its split's crops, as the synthesis does."""
    test_script = conftest.test_script()
    root, checkpoints, _ = dataset
    runs = tmp_path / "runs"
    shutil.copytree(checkpoints / "real_sagittal", runs / "real_sagittal")
    here = CropStore(root / "straightened").geometry("p1_20")
    other = CropGeometry(tuple(2 * n for n in here.shape), here.spacing_mm)
    write_json(runs / "real_sagittal" / "train_crops.json", {"geometries": [{**other.as_dict(), "crops": 5}]})
    argv = ["--dataroot", str(root / "straightened"), "--vertebra_json", str(root / "vertebra_data.json")]
    argv += ["--name", "real_sagittal", "--checkpoints_dir", str(runs), "--model", "healthivert"]
    argv += ["--dataset_mode", "aligned_sagittal", "--results_dir", str(tmp_path / "results")]
    argv += ["--phase", "train", "--gpu_ids", "-1", "--num_test", "1"]
    assert test_script.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"warning: 2 crop(s) here are {here.describe()}; run 'real_sagittal' was trained on" in out


def test_cam_folder_and_batch_size_give_the_same_volumes(dataset, tmp_path):
    root, checkpoints, _ = dataset
    outputs = []
    for n, batch in enumerate(("0", "1")):
        out = tmp_path / str(n)
        argv = cli_args(root, checkpoints, out, "--vertebrae", "p1_20", "--batch_slices", batch)
        assert synth_cli.main([*argv, "--cam_folder", str(root / "heatmap")]) == 0
        outputs.append(np.asarray(nib.load(str(out / "CT_fake" / "p1_20.nii.gz")).dataobj).astype(int))
    assert np.abs(outputs[0] - outputs[1]).max() <= 1  # rounding to uint8 may differ by one


def test_bad_inputs_give_one_line_and_status_2(dataset, tmp_path, capsys):
    root, checkpoints, _ = dataset
    with pytest.raises(SystemExit) as exc:  # argparse: --name and --output_dir are required
        synth_cli.main([])
    assert exc.value.code == 2 and "--name" in capsys.readouterr().err
    broken = tmp_path / "runs"
    write_run(broken, "no_ckpt", "sagittal")
    (broken / "no_ckpt" / "latest_net_G.pth").unlink()
    write_run(broken, "no_opt", "sagittal")
    (broken / "no_opt" / "opt.json").unlink()
    out = tmp_path / "out"
    cases = [
        (cli_args(root, checkpoints, out, "--name", "missing"), "no such run"),
        (cli_args(root, broken, out, "--name", "no_ckpt"), "checkpoint not found"),
        (cli_args(root, broken, out, "--name", "no_opt"), "opt.json"),
        (cli_args(tmp_path / "nowhere", checkpoints, out), "no straightened crops"),
        (cli_args(root, checkpoints, out, "--phase", "val"), "empty"),
        (cli_args(root, checkpoints, out, "--vertebrae", "p1_22"), "no crop for p1_22"),
        (cli_args(root, checkpoints, out, "--shard", "3/2"), "shard"),
        (cli_args(root, checkpoints, out, "--plane", "fusion"), "--name_coronal"),
        (cli_args(root, checkpoints, out, "--plane", "coronal"), "trained on sagittal"),
        (cli_args(root, checkpoints, out, "--cam_folder", str(tmp_path)), "attention map not found"),
    ]
    for argv, message in cases:
        assert synth_cli.main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (out / "CT_fake").exists() or not any((out / "CT_fake").iterdir())


def test_bad_maps_checkpoints_and_crops_name_their_file(dataset, tmp_path, capsys):
    """An attention map out of [0, 1] or off the crop's grid, weights that do not fit opt.json, and
    a crop without its own vertebra: one line naming the file, status 2, nothing written."""
    root, checkpoints, info = dataset
    scaled, flipped = tmp_path / "cam255", tmp_path / "camflip"
    for key in ("p1_19", "p1_20", "p1_21"):
        cam = np.asarray(nib.load(root / "heatmap" / f"{key}.nii.gz").dataobj, np.float32)
        write_nifti(scaled / f"{key}.nii.gz", cam * 255.0, info["affine"])
        write_nifti(flipped / f"{key}.nii.gz", cam, np.diag([-SPACING_MM, SPACING_MM, SPACING_MM, 1.0]))
    runs = tmp_path / "runs"
    write_healthivert_run(runs, "wide", "sagittal", root / "straightened")
    opt = json.loads((runs / "wide" / "opt.json").read_text())
    opt["ngf"] = 2 * opt["ngf"]
    (runs / "wide" / "opt.json").write_text(json.dumps(opt))
    crops = tmp_path / "crops"
    for kind in ("CT", "label"):
        os.makedirs(crops / kind)
        volume = info["ct"] if kind == "CT" else np.where(info["label"] == 19, 0, info["label"])
        write_nifti(crops / kind / "p1_19.nii.gz", volume.astype(np.uint8), info["affine"])
    out = tmp_path / "out"
    wide = cli_args(root, runs, out, "--name", "wide")
    cases = [
        (
            cli_args(root, checkpoints, out, "--cam_folder", str(scaled)),
            "p1_19.nii.gz: values outside [0, 1]",
        ),
        (cli_args(root, checkpoints, out, "--cam_folder", str(flipped)), "p1_19.nii.gz: affine differs"),
        (wide, "latest_net_G.pth: does not fit the network"),
        (
            cli_args(root, checkpoints, out, "--dataroot", str(crops)),
            "label/p1_19.nii.gz: no voxel of vertebra 19",
        ),
    ]
    for argv, message in cases:
        assert synth_cli.main(argv) == 2, message
        err = capsys.readouterr().err.strip().splitlines()  # a crop's error comes after the bar
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert sum("error" in line for line in err) == 1, err
    assert not (out / "CT_fake").exists() or not any((out / "CT_fake").iterdir())


def test_mixed_precision_synthesis_matches_fp32_on_cpu(dataset, tmp_path, monkeypatch):
    """The CUDA path (bf16 autocast, channels_last) on the CPU: the same volumes as fp32 to within
    the bound the GPU test holds (under 1 % of the label's voxels differ)."""
    root, checkpoints, _ = dataset
    outs = []
    for amp in (False, True):
        if amp:
            conftest.use_cuda_precision_on_cpu(monkeypatch)
        out = tmp_path / str(amp)
        argv = cli_args(root, checkpoints, out, "--vertebrae", "p1_20")
        argv[argv.index("--name") + 1] = "real_sagittal"
        assert synth_cli.main(argv) == 0
        outs.append(
            [np.asarray(nib.load(str(out / f / "p1_20.nii.gz")).dataobj) for f in ("label_fake", "CT_fake")]
        )
    (label, ct), (label_mixed, ct_mixed) = outs
    assert (ct != ct_mixed).any()  # the bf16 path did run (about 1.7 % of the voxels differ)
    assert (label != label_mixed).mean() < 0.01
    assert np.abs(ct.astype(np.int16) - ct_mixed.astype(np.int16)).mean() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(dataset, tmp_path):
    root, checkpoints, _ = dataset
    outs = []
    for gpu in ("-1", "0"):
        out = tmp_path / gpu
        argv = cli_args(root, checkpoints, out, "--vertebrae", "p1_20")
        argv[argv.index("--gpu_ids") + 1] = gpu
        assert synth_cli.main(argv) == 0
        outs.append(np.asarray(nib.load(str(out / "label_fake" / "p1_20.nii.gz")).dataobj))
    assert (outs[0] != outs[1]).mean() < 0.01


def test_default_slices_per_pass():
    """All slices of a step on a GPU; on the CPU about 65k pixels per pass, at least one slice."""
    assert auto_batch_slices("cuda", 256 * 256) == 0
    assert auto_batch_slices("cpu", 256 * 256) == 1
    assert auto_batch_slices("cpu", 512 * 512) == 1
    assert auto_batch_slices("cpu", 128 * 128) == 4
    assert auto_batch_slices("cpu", 96 * 64) == 10


# --- coronal synthesis: the padding columns stay padding --------------------------------------
PAD_SHAPE = (64, 32, 16)  # rows (2 mm), AP, LR: coronal slices are 16 wide, padded to 32
PAD_BODIES = {19: (15, 25), 20: (28, 38), 21: (41, 51)}


def _padded_phantom():
    label = np.zeros(PAD_SHAPE, np.uint8)
    for vid, (r0, r1) in PAD_BODIES.items():
        label[r0:r1, 8:24, 3:13] = vid
    ct = (np.arange(PAD_SHAPE[0])[:, None, None] * 3 + 20 + np.zeros(PAD_SHAPE, int)).astype(np.uint8)
    return ct, label


def test_coronal_synthesis_keeps_padding_columns_as_in_training():
    """Each step's input must look like a training sample: the columns padded onto a coronal
    slice are -1 in the CT image and 0 in the maps. A model writes its generated rows across
    the whole width; those rows must not carry into the next step's padding."""
    ct, label = _padded_phantom()
    cam = np.full(PAD_SHAPE, 0.5, np.float32)
    calls = []

    def model(batch):
        calls.append({k: v.clone() for k, v in batch.items()})
        x1, x2 = batch["x1"].reshape(-1), batch["x2"].reshape(-1)
        rows = x2 - x1 + 2  # a little taller than observed
        image = torch.full_like(batch["ct"], 0.6)  # generated everywhere, padding included
        out_ct = compose(image, batch["ct"], x1, x2, rows, -1.0)
        seg = compose(torch.ones_like(image), torch.zeros_like(image), x1, x2, rows, 0.0)
        return {"ct": out_ct, "seg": seg, "rows": rows, "top": (x1 + x2) // 2 - rows // 2}

    settings = SynthesisSettings(hole_rows=20, min_area_px=50, min_component_px=12, width=PAD_SHAPE[1])
    synthesise_crop(ct, label, cam, 20, "coronal", model, settings)
    assert len(calls) == 3  # upper, lower, target
    c0, c1 = 8, 24  # 16 columns centred in 32
    for step, batch in enumerate(calls):
        pad = torch.ones(PAD_SHAPE[1], dtype=torch.bool)
        pad[c0:c1] = False
        assert torch.all(batch["ct_masked"][..., pad] == -1), f"step {step}: CT padding is not -1"
        assert torch.all(batch["ct"][..., pad] == -1), f"step {step}: CT padding is not -1"
        assert torch.all(batch["cam"][..., pad] == 0), f"step {step}: CAM padding is not 0"
        assert torch.all(batch["neighbour_mask"][..., pad] == 0), f"step {step}: label padding is not 0"

"""Synthesis reruns: outputs of another synthesis are never taken as finished, an interrupted
--overwrite never leaves a mixed pair, the completeness check reads volumes whole on the crop's
grid, and the demo redoes the stages made from results it has just replaced."""

from __future__ import annotations

import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import demo
import eval_3d_sagittal_twostage as synth_cli
from tests.conftest import write_nifti
from tests.test_demo import quick_opt, save_train_state
from tests.test_synthesis import SHAPE, cli_args, write_dataset, write_run
from util import check_outputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    info = write_dataset(root)
    checkpoints = root / "checkpoints"
    write_run(checkpoints, "hv", "sagittal", seed=1)
    write_run(checkpoints, "hv2", "sagittal", seed=5)
    return root, checkpoints, info


def volumes(out, key="p1_19"):
    return tuple(
        np.asarray(nib.load(str(out / sub / f"{key}.nii.gz")).dataobj) for sub in ("CT_fake", "label_fake")
    )


def run_args(root, checkpoints, out, name, *extra):
    argv = cli_args(root, checkpoints, out, "--phase", "train", *extra)
    argv[argv.index("--name") + 1] = name
    return argv


# --- stale outputs --------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["other run", "retrained run"])
def test_outputs_of_another_synthesis_are_not_skipped_as_finished(dataset, tmp_path, capsys, change):
    """A rerun into a folder holding another synthesis's outputs (another run, or the same run
    retrained: new weights under the same name and epoch) must not report them as 'already done'
    and hand them to RHLV as this run's: it stops with one error naming a file, writes nothing,
    and with --overwrite writes what a fresh synthesis writes."""
    root, checkpoints, _ = dataset
    out, fresh = tmp_path / "O", tmp_path / "fresh"
    assert synth_cli.main(run_args(root, checkpoints, out, "hv")) == 0
    old = volumes(out)
    if change == "other run":
        name = "hv2"
    else:  # the same name, retrained
        name = "hv"
        write_run(checkpoints, "hv", "sagittal", seed=5)
    assert synth_cli.main(run_args(root, checkpoints, fresh, name)) == 0
    new = volumes(fresh)
    assert not np.array_equal(old[0], new[0])  # the two syntheses differ
    capsys.readouterr()

    assert synth_cli.main(run_args(root, checkpoints, out, name)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: ") and "\n" not in err and "another synthesis" in err and "--overwrite" in err
    )
    assert all(np.array_equal(a, b) for a, b in zip(volumes(out), old, strict=True))  # left alone

    assert synth_cli.main(run_args(root, checkpoints, out, name, "--overwrite")) == 0
    assert all(np.array_equal(a, b) for a, b in zip(volumes(out), new, strict=True))
    assert synth_cli.main(run_args(root, checkpoints, out, name)) == 0  # now finished: skipped
    assert "synthesised 0 vertebrae" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["crop straightened again", "map made again", "written before inputs"])
def test_outputs_made_from_other_inputs_are_synthesised_again(dataset, tmp_path, capsys, change):
    """Crops straightened again (or attention maps made again) into the same dataset: what this
    synthesis made from the old ones is stale, so a rerun without --overwrite does those crops
    again (saying so) and gives what a fresh synthesis gives, like the maps' rule (a crop newer
    than its map). Outputs written before outputs recorded their inputs are redone the same way."""
    root, checkpoints, info = dataset
    out, fresh = tmp_path / "O", tmp_path / "fresh"
    maps = ("--cam_folder", str(root / "heatmap"))
    assert synth_cli.main(run_args(root, checkpoints, out, "hv", *maps)) == 0
    old = volumes(out)
    if change == "crop straightened again":
        ct = info["ct"].copy()
        ct[:, :, : ct.shape[2] // 2] //= 2  # another CT under the same name
        write_nifti(root / "straightened" / "CT" / "p1_19.nii.gz", ct, info["affine"])
    elif change == "map made again":
        cam = np.random.default_rng(99).random(info["ct"].shape).astype(np.float32)
        write_nifti(root / "heatmap" / "p1_19.nii.gz", cam, info["affine"])
    else:  # the header as written before: the synthesis digest alone
        for sub in ("CT_fake", "label_fake"):
            path = out / sub / "p1_19.nii.gz"
            img = nib.load(str(path))
            synthesis, _ = synth_cli.made_by(path)
            img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
            img.header["descrip"] = (synth_cli.DESCRIP_PREFIX + synthesis).encode()
            nib.save(img, str(path))
        assert synth_cli.made_by(out / "CT_fake" / "p1_19.nii.gz")[1] == ""
    assert synth_cli.main(run_args(root, checkpoints, fresh, "hv", *maps)) == 0
    new = volumes(fresh)
    if change == "crop straightened again":  # (the test model draws no map into its image)
        assert not np.array_equal(old[0], new[0])  # the new input changes the synthesis
    capsys.readouterr()

    assert synth_cli.main(run_args(root, checkpoints, out, "hv", *maps)) == 0
    text = capsys.readouterr().out
    assert "1 crops (p1_19) have outputs made from other crops or attention maps" in text
    assert "synthesised 1 vertebrae" in text and "1 already done" in text  # p1_21 kept
    assert all(np.array_equal(a, b) for a, b in zip(volumes(out), new, strict=True))
    assert synth_cli.main(run_args(root, checkpoints, out, "hv", *maps)) == 0  # now finished
    assert "synthesised 0 vertebrae" in capsys.readouterr().out


def test_a_moved_dataset_or_a_threshold_given_as_used_is_still_finished(dataset, tmp_path, capsys):
    """The same crops in another folder, and --min_component_mm2 given at the value the run's own
    default gives, make the same outputs: a rerun skips them."""
    root, checkpoints, _ = dataset
    out = tmp_path / "O"
    assert synth_cli.main(run_args(root, checkpoints, out, "hv")) == 0
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "straightened", moved / "straightened")
    shutil.copy(root / "vertebra_data.json", moved / "vertebra_data.json")
    capsys.readouterr()
    assert synth_cli.main(run_args(moved, checkpoints, out, "hv")) == 0
    assert "synthesised 0 vertebrae" in capsys.readouterr().out
    as_used = str(synth_cli.MIN_COMPONENT_AREA_MM2)  # the run saved no --min_area_mm2
    assert synth_cli.main(run_args(root, checkpoints, out, "hv", "--min_component_mm2", as_used)) == 0
    assert "synthesised 0 vertebrae" in capsys.readouterr().out


class Killed(BaseException):
    """The job killed between two writes."""


def test_an_interrupted_overwrite_never_leaves_a_new_ct_beside_an_old_label(dataset, tmp_path, monkeypatch):
    """--overwrite killed after a crop's CT_fake and before its label_fake: the rerun must redo
    that crop, not skip a pair whose CT is the new run's and whose label is the old run's."""
    root, checkpoints, _ = dataset
    out, fresh = tmp_path / "O", tmp_path / "fresh"
    assert synth_cli.main(run_args(root, checkpoints, out, "hv")) == 0
    assert synth_cli.main(run_args(root, checkpoints, fresh, "hv2")) == 0
    new = volumes(fresh)
    assert not np.array_equal(volumes(out)[1], new[1])  # the labels differ between the runs

    real_save = nib.save

    def killed_at_first_label(img, path, *args, **kwargs):
        if "label_fake" in str(path):
            raise Killed()
        return real_save(img, path, *args, **kwargs)

    monkeypatch.setattr(nib, "save", killed_at_first_label)
    with pytest.raises(Killed):
        synth_cli.main(run_args(root, checkpoints, out, "hv2", "--overwrite"))
    monkeypatch.setattr(nib, "save", real_save)

    # no crop holds a complete pair mixing the two runs
    ct, label = (out / sub / "p1_19.nii.gz" for sub in ("CT_fake", "label_fake"))
    if ct.exists() and label.exists():
        assert np.array_equal(volumes(out)[0], new[0]) == np.array_equal(volumes(out)[1], new[1])
    # resubmitted without --overwrite: it refuses (other outputs here), or completes this run's
    status = synth_cli.main(run_args(root, checkpoints, out, "hv2"))
    assert status in (0, 2)
    if status == 0:
        for key in ("p1_19", "p1_21"):
            got, want = volumes(out, key), volumes(fresh, key)
            assert np.array_equal(got[0], want[0]), key
            assert np.array_equal(got[1], want[1]), key  # not the old run's label


# --- util.check_outputs -------------------------------------------------------------------------
def complete_outputs(root, info, out):
    for key in ("p1_19", "p1_20", "p1_21"):
        write_nifti(out / "CT_fake" / f"{key}.nii.gz", info["ct"], info["affine"])
        write_nifti(out / "label_fake" / f"{key}.nii.gz", info["label"], info["affine"])
    return ["--dataroot", str(root / "straightened"), "--output_dir", str(out)]


def test_check_outputs_counts_a_volume_cut_short_as_missing(tmp_path, capsys):
    """README: 'a volume cut short by a killed task counts as missing'; its header still reads."""
    root = tmp_path / "data"
    info = write_dataset(root)
    out = tmp_path / "O"
    check = complete_outputs(root, info, out)
    assert check_outputs.main(check) == 0
    path = out / "label_fake" / "p1_20.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with gzip.open(path) as f:  # the header (first 348 bytes) is still there
        assert len(f.read(348)) == 348
    capsys.readouterr()
    assert check_outputs.main(check) == 1
    assert "missing: p1_20" in capsys.readouterr().out


def test_check_outputs_counts_a_volume_off_the_crop_grid_as_missing(tmp_path, capsys):
    """Outputs must lie on the crop's grid (DESIGN: synthesis outputs 'on the crop's grid'): a
    volume of another shape (crops straightened with another --crop_mm) is not this crop's."""
    root = tmp_path / "data"
    info = write_dataset(root)
    out = tmp_path / "O"
    check = complete_outputs(root, info, out)
    small = info["ct"][: SHAPE[0] // 2]
    write_nifti(out / "CT_fake" / "p1_21.nii.gz", small, info["affine"])
    capsys.readouterr()
    assert check_outputs.main(check) == 1
    assert "missing: p1_21" in capsys.readouterr().out


# --- demo ---------------------------------------------------------------------------------------
def test_demo_redoes_later_stages_after_training_again(tmp_path, monkeypatch):
    """A rerun that has to train HealthiVert again (its train state is gone) must not reuse the
    synthesis, RHLV, grading and metrics made from the old weights: each of those stages is run
    with --overwrite. A rerun that reuses the finished run redoes nothing."""
    out = tmp_path / "W"
    run = out / "checkpoints" / "healthivert"
    calls: dict[str, list[str]] = {}
    monkeypatch.setattr(demo.train, "main", lambda argv: calls.update(train=argv) or 0)
    for script in (
        demo.eval_3d_sagittal_twostage,
        demo.RHLV_quantification,
        demo.SVM_grading,
        demo.generation_eval_sagittal,
    ):
        monkeypatch.setattr(script, "main", lambda argv, _n=script.__name__: calls.update({_n: argv}) or 0)
    later = ("eval_3d_sagittal_twostage", "evaluation.RHLV_quantification", "evaluation.SVM_grading")
    later += ("evaluation.generation_eval_sagittal",)

    for state, retrained in ((None, True), ((1, 0), False)):  # QUICK trains 1 + 0 epochs
        calls.clear()
        if state is None:
            run.mkdir(parents=True, exist_ok=True)
            for name in ("latest_net_G.pth", "opt.json"):  # weights, but no train state
                (run / name).write_bytes(b"x")
        else:
            save_train_state(run, *state)
        pipe = demo.Pipeline(out, quick_opt(out), demo.QUICK)
        for stage in (pipe.train, pipe.synthesise, pipe.rhlv, pipe.grading, pipe.metrics):
            stage()
        assert ("train" in calls) == retrained
        for name in later:
            assert ("--overwrite" in calls[name]) == retrained, name


def test_demo_redoes_later_stages_after_the_synthesis_wrote_again(tmp_path, monkeypatch):
    """The synthesis redoes crops whose outputs were made from other crops or maps on its own: a
    volume it writes after the RHLV table makes the later stages run again with --overwrite; a
    synthesis that wrote nothing leaves them finished."""
    out = tmp_path / "W"
    pipe = demo.Pipeline(out, quick_opt(out), demo.QUICK)
    table = out / "rhlv" / "gan" / "rhlv.csv"
    table.parent.mkdir(parents=True)
    table.write_text("x")
    volume = pipe.synthesis / "CT_fake" / "p_20.nii.gz"
    volume.parent.mkdir(parents=True)
    calls: dict[str, list[str]] = {}
    for script in (demo.eval_3d_sagittal_twostage, demo.RHLV_quantification):
        monkeypatch.setattr(script, "main", lambda argv, _n=script.__name__: calls.update({_n: argv}) or 0)
    for writes in (False, True):
        calls.clear()
        pipe.redo = False
        volume.write_bytes(b"x")
        os.utime(volume, ns=(table.stat().st_mtime_ns + (1 if writes else -1) * 10**9,) * 2)
        pipe.synthesise()
        pipe.rhlv()
        assert ("--overwrite" in calls["evaluation.RHLV_quantification"]) == writes

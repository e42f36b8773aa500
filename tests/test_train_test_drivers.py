"""train.py and test.py: failing commands leave runs as they were, --seed and flags at their default
value act at test time, a resumed run keeps its whole loss curve, validation means are per sample."""

import hashlib
import json
import shutil

import pytest
import torch

import train
from tests import conftest
from tests.test_framework import tiny_args as framework_args

test_script = conftest.test_script()

SYNTH = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--crop_size", "32", "--gpu_ids", "-1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(ckpt, name="run", *extra):
    """test_framework's tiny run, in checkpoints folder ``ckpt`` under ``name``."""
    args = framework_args(ckpt.parent, *extra)
    args[args.index("--checkpoints_dir") + 1] = str(ckpt)
    args[args.index("--name") + 1] = name
    return args


def pix2pix_args(ckpt, name="run", *extra):
    return [
        *SYNTH,
        "--model",
        "pix2pix",
        "--name",
        name,
        "--checkpoints_dir",
        str(ckpt),
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--num_threads",
        "0",
        "--batch_size",
        "2",
        "--n_epochs",
        "1",
        "--n_epochs_decay",
        "0",
        "--max_dataset_size",
        "2",
        "--val_freq",
        "0",
        *extra,
    ]


# --- a failing command writes nothing, and says why in one line ---------------------------------


def test_a_failed_resume_leaves_the_runs_opt_json_as_it_was(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert train.main(tiny_args(ckpt)) == 0
    saved = (ckpt / "run" / "opt.json").read_text()
    # a resume from an epoch that was never saved, with another learning rate: it must fail ...
    bad = tiny_args(ckpt, "run", "--continue_train", "--epoch", "7")
    bad[bad.index("0.01")] = "0.5"
    assert train.main(bad) == 2
    assert "7_net_G.pth: checkpoint not found" in capsys.readouterr().err
    # ... and the run's options (which test.py and the 3D synthesis rebuild it from) stay the run's
    assert (ckpt / "run" / "opt.json").read_text() == saved


def test_a_bad_dataroot_leaves_no_run_folder(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ["--dataroot", str(tmp_path / "missing"), "--checkpoints_dir", str(ckpt), "--gpu_ids", "-1"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'missing'}") and err.count("\n") == 1
    assert not ckpt.exists()  # no opt.json of a run that never started


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--norm", "foo", "unknown norm 'foo'"),
        ("--gan_mode", "foo", "unknown gan_mode 'foo'"),
        ("--lr_policy", "foo", "unknown lr_policy 'foo'"),
    ],
)
def test_an_unknown_flag_value_is_one_error_line_and_no_output(tmp_path, capsys, flag, value, message):
    ckpt = tmp_path / "ckpt"
    assert train.main(pix2pix_args(ckpt, "run", flag, value)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (ckpt / "run").exists()


def test_a_checkpoints_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "ckpt"
    blocker.write_text("not a folder")
    assert train.main(tiny_args(blocker)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker}") and err.count("\n") == 1
    assert blocker.read_text() == "not a folder"


# --- test.py ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_pix2pix(tmp_path_factory):
    """A one-iteration pix2pix run (dropout in its U-Net, as pix2pix has by default)."""
    ckpt = tmp_path_factory.mktemp("p2p") / "ckpt"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert train.main(pix2pix_args(ckpt)) == 0
    torch.set_num_threads(before)
    return ckpt


def script_args(ckpt, results, *extra):
    args = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--model", "pix2pix", "--name", "run"]
    args += ["--checkpoints_dir", str(ckpt), "--results_dir", str(results), "--num_test", "2"]
    return [*args, "--crop_size", "32", "--gpu_ids", "-1", *extra]


def fake_images(results):
    folder = results / "run" / "test_latest" / "images"
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*fake_B.png"))}


def test_test_script_results_follow_seed_not_what_ran_before(trained_pix2pix, tmp_path):
    # without --eval pix2pix keeps its dropout at test time (its noise): --seed must fix it
    torch.manual_seed(1)
    assert test_script.main(script_args(trained_pix2pix, tmp_path / "a", "--seed", "3")) == 0
    torch.manual_seed(2)
    assert test_script.main(script_args(trained_pix2pix, tmp_path / "b", "--seed", "3")) == 0
    a, b = fake_images(tmp_path / "a"), fake_images(tmp_path / "b")
    assert len(a) == 2 and a == b


def test_a_test_flag_given_at_its_default_value_is_not_ignored(trained_pix2pix, tmp_path):
    # a run trained with the reference's normal threshold, tested with ours, given on the command line
    path = trained_pix2pix / "run" / "opt.json"
    saved = json.loads(path.read_text())
    try:
        path.write_text(json.dumps({**saved, "normal_max_grade": 1, "vert_class": "all"}))
        opt = test_script.test_options(
            script_args(trained_pix2pix, tmp_path, "--normal_max_grade", "0", "--vert_class", "normal")
        )
        assert (opt.normal_max_grade, opt.vert_class) == (0, "normal")
        opt = test_script.test_options(script_args(trained_pix2pix, tmp_path))  # not given: the run's
        assert (opt.normal_max_grade, opt.vert_class) == (1, "all")
    finally:
        path.write_text(json.dumps(saved))


def test_a_resume_refuses_networks_of_another_save_than_its_train_state(tmp_path, capsys):
    """Each checkpoint file is written atomically, but not the set: a save interrupted after the
    networks and before the train state leaves weights of another iteration beside it."""
    ckpt = tmp_path / "ckpt"
    assert train.main(tiny_args(ckpt)) == 0
    run = ckpt / "run"
    (run / "latest_net_G.pth").write_bytes((run / "1_net_G.pth").read_bytes())
    assert train.main(tiny_args(ckpt, "run", "--continue_train", "--epoch", "latest")) == 2
    err = capsys.readouterr().err
    assert "latest_net_G.pth: not the network latest_train_state.pth was saved with" in err
    assert train.main(tiny_args(ckpt, "run", "--continue_train", "--epoch", "1")) == 0  # a whole set


# --- the loss curve of a resumed run --------------------------------------------------------------


def test_a_resumed_run_keeps_the_loss_curve_of_the_epochs_before(tmp_path, monkeypatch):
    import util.visualizer

    drawn = {}
    plot = util.visualizer.save_loss_curves

    def record(history, path, title=""):
        drawn[str(path)] = {k: list(v) for k, v in history.items()}
        plot(history, path, title)

    monkeypatch.setattr(util.visualizer, "save_loss_curves", record)
    ckpt = tmp_path / "ckpt"
    assert train.main(tiny_args(ckpt)) == 0  # epochs 1-3, 4 iterations each, a print every 2
    straight = drawn[str(ckpt / "run" / "loss_curve.png")]
    assert [x for x, _ in straight["G_L1"]] == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    # resume the same run from its epoch-1 checkpoint (a copy, to compare with the straight one)
    resumed = ckpt / "resumed"
    shutil.copytree(ckpt / "run", resumed)
    assert train.main(tiny_args(ckpt, "resumed", "--continue_train", "--epoch", "1")) == 0
    # the resumed run's curve is the straight run's: epoch 1 from before the resume, 2-3 after it
    assert drawn[str(resumed / "loss_curve.png")] == straight


# --- validation means -----------------------------------------------------------------------------


def validated_history(tmp_path, monkeypatch, validation_metrics, max_val_samples: int) -> list:
    """``val_metrics.json`` of a one-epoch tiny run whose model reports ``validation_metrics``."""
    from tests.fixtures.tiny_model import TinyModel

    monkeypatch.setattr(TinyModel, "validation_metrics", validation_metrics, raising=False)
    ckpt = tmp_path / "ckpt"
    args = tiny_args(ckpt, "run", "--val_freq", "1", "--max_val_samples", str(max_val_samples))
    args[args.index("--n_epochs_decay") + 1] = "0"
    args[args.index("--n_epochs") + 1] = "1"
    assert train.main(args) == 0
    return json.loads((ckpt / "run" / "val_metrics.json").read_text())


def test_validation_means_are_per_sample_whatever_the_batch_keys(tmp_path, monkeypatch):
    def validation_metrics(self):  # per-sample values, as the contract says; one NaN per batch
        b = self.real_A.shape[0]
        nan_first = torch.ones(b)
        nan_first[0] = float("nan")
        return {"one": torch.ones(b), "one_or_nan": nan_first}

    history = validated_history(tmp_path, monkeypatch, validation_metrics, 8)
    # the tiny samples have no "ct" entry: the mean must still be over samples, not batches, and a
    # NaN left out of the mean is left out of its count too
    assert history == [{"epoch": 1, "one": 1.0, "one_or_nan": 1.0}]


def test_a_validation_metric_without_a_finite_value_is_null_not_zero(tmp_path, monkeypatch, capsys):
    """A metric every sample gave NaN for used to be recorded as 0.0, which for an error reads as
    perfect (and the plateau policy would have stepped on it)."""

    def validation_metrics(self):
        b = self.real_A.shape[0]
        return {"one": torch.ones(b), "never": torch.full((b,), float("nan"))}

    history = validated_history(tmp_path, monkeypatch, validation_metrics, 4)
    assert history == [{"epoch": 1, "one": 1.0, "never": None}]
    assert "never: n/a" in capsys.readouterr().out


def test_an_evaluation_pass_takes_exactly_max_dataset_size_samples():
    """Validation promises at most --max_val_samples samples; whole batches used to overshoot
    (5 of 8 samples at batch 2 for a limit of 5 gave 6)."""
    import argparse

    from data import create_dataset

    base = dict(dataset_mode="tests.fixtures.tiny_dataset", dataroot=".", batch_size=2, serial_batches=True)
    base["num_threads"] = 0
    for limit, expected in ((5, 5), (8, 8), (float("inf"), 8)):
        opt = argparse.Namespace(**base, isTrain=False, max_dataset_size=limit, phase="val")
        paths = [p for batch in create_dataset(opt) for p in batch["path"]]
        assert paths == [f"sample{i}.png" for i in range(expected)]


def test_sample_names_keep_the_slice_and_never_repeat():
    from test import sample_stem

    used: set[str] = set()
    assert sample_stem(["/d/heart.nii.gz#slice40"], 0, used) == "heart_slice40"
    assert sample_stem(["/d/heart.nii.gz#slice41"], 1, used) == "heart_slice41"
    assert sample_stem(["/d/heart.nii.gz#slice40"], 2, used) == "heart_slice40_00002"
    assert sample_stem(["/d/p0_20.nii.gz"], 3, used) == "p0_20"
    assert sample_stem([], 4, used) == "00004"


def test_flags_a_model_does_not_read_are_warned_of_and_do_not_count_as_changes(capsys):
    """The reference's commands pass flags HealthiVert does not read (--preprocess, --pool_size,
    --netG ...): accepted, said to be ignored, and no reason to call two runs different."""
    from options.base_options import option_changes
    from options.train_options import TrainOptions, not_learning_options

    opt = TrainOptions().parse(["--model", "healthivert", "--pool_size", "50", "--preprocess", "crop"])
    err = capsys.readouterr().err
    assert "does not use --pool_size 50, --preprocess crop: ignored" in err
    plain = vars(TrainOptions().parse(["--model", "healthivert"]))
    assert capsys.readouterr().err == ""
    assert option_changes(plain, opt, not_learning_options(opt)) == []
    TrainOptions().parse(["--model", "pix2pix", "--netG", "unet_256", "--spacing_mm", "2"])
    said = "on --dataset_mode aligned_sagittal does not use --spacing_mm 2.0: ignored"
    assert capsys.readouterr().err.strip() == f"warning: --model pix2pix {said}"

"""Options, registries, BaseModel checkpoints, the visualizer and the training loop."""

import argparse
import json
import warnings

import pytest
import torch

import models
import train
from options.base_options import load_options, option_changes, setup
from options.test_options import TestOptions
from options.train_options import TrainOptions
from util.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, state_mismatch
from util.registry import RegistryError, find_class
from util.visualizer import Visualizer, tensor2im

TINY = ["--model", "tests.fixtures.tiny_model", "--dataset_mode", "tests.fixtures.tiny_dataset"]


def tiny_args(tmp_path, *extra):
    return [
        *TINY,
        "--checkpoints_dir",
        str(tmp_path / "ckpt"),
        "--name",
        "run",
        "--batch_size",
        "2",
        "--num_threads",
        "0",
        "--gpu_ids",
        "-1",
        "--print_freq",
        "4",
        "--display_freq",
        "4",
        "--n_epochs",
        "2",
        "--n_epochs_decay",
        "1",
        "--save_epoch_freq",
        "1",
        "--lr",
        "0.01",
        *extra,
    ]


def test_parse_takes_an_explicit_list_and_has_no_side_effects(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog", "--batch_size", "99"])
    opt = TrainOptions().parse(tiny_args(tmp_path))
    assert opt.batch_size == 2 and opt.isTrain and opt.gpu_ids == []
    assert TrainOptions().parse([*TINY]).batch_size == 12  # sys.argv is never read
    assert not (tmp_path / "ckpt").exists()
    test_opt = TestOptions().parse([*TINY, "--phase", "val"])
    assert test_opt.phase == "val" and test_opt.serial_batches and not test_opt.isTrain
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="running on the CPU"):
            assert TrainOptions().parse([*TINY, "--gpu_ids", "0"]).gpu_ids == []


def test_setup_saves_options_that_load_back(tmp_path, capsys):
    options = TrainOptions()
    opt = options.parse(tiny_args(tmp_path, "--mask_height_mm", "32"))
    setup(opt, options.parser_)
    assert "mask_height_mm" in capsys.readouterr().out
    saved = load_options(tmp_path / "ckpt" / "run" / "opt.json", phase="test")
    assert saved.mask_height_mm == 32 and saved.phase == "test" and saved.max_dataset_size == float("inf")


def test_unknown_names_list_the_available_ones():
    with pytest.raises(RegistryError, match="unknown model 'nope'; available:"):
        models.find_model_using_name("nope")
    with pytest.raises(RegistryError, match="unknown dataset 'nope'"):
        TrainOptions().parse(["--model", "tests.fixtures.tiny_model", "--dataset_mode", "nope"])
    with pytest.raises(RegistryError, match="cannot import"):
        models.find_model_using_name("no_such_package.thing_model")
    assert find_class("tests.fixtures", "tiny", "model", models.BaseModel).__name__ == "TinyModel"


def test_checkpoint_round_trip_with_rng_state(tmp_path):
    state = rng_state()
    expected = torch.rand(3)
    save_checkpoint({"rng": state, "w": torch.ones(2)}, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth")  # weights_only=True
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_visualizer_writes_html_log_and_curve(tmp_path):
    opt = TrainOptions().parse(tiny_args(tmp_path))
    vis = Visualizer(opt)
    visuals = {"real_A": torch.rand(1, 1, 8, 8) * 2 - 1, "mask": torch.rand(1, 1, 8, 8)}
    vis.display_current_results(visuals, epoch=1, save_result=True)
    vis.plot_current_losses(1, 0.5, {"G_L1": 0.3})
    vis.print_current_losses(1, 4, {"G_L1": 0.3}, 0.01, 0.0)
    run = tmp_path / "ckpt" / "run"
    assert (run / "web" / "index.html").read_text().count("epoch001_") >= 2
    assert (run / "web" / "images" / "epoch001_mask.png").exists()
    assert "G_L1: 0.300" in (run / "loss_log.txt").read_text()
    assert (run / "loss_curve.png").stat().st_size > 0
    assert tensor2im(torch.zeros(1, 1, 4, 4) - 1).max() == 0


def test_visdom_is_opt_in_and_never_blocks(tmp_path):
    opt = TrainOptions().parse(tiny_args(tmp_path, "--display_id", "1", "--display_port", "1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vis = Visualizer(opt)
        vis.display_current_results({"x": torch.zeros(1, 1, 4, 4)}, 1, True)
    assert vis.display_id == 0 and vis.vis is None
    assert sum("visdom display off" in str(w.message) for w in caught) == 1


def final_weights(run_dir):
    return load_checkpoint(run_dir / "latest_net_G.pth")


def test_training_loop_checkpoints_and_resumes_exactly(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path)) == 0
    run = tmp_path / "ckpt" / "run"
    for name in (
        "1_net_G.pth",
        "1_train_state.pth",
        "3_net_G.pth",
        "latest_net_G.pth",
        "opt.json",
        "loss_log.txt",
        "loss_curve.png",
        "web/index.html",
    ):
        assert (run / name).exists(), name
    assert "trained tests.fixtures.tiny_model for epochs 1-3" in capsys.readouterr().out

    # resume from the end of epoch 1 in a fresh run directory: epochs 2-3 must land on the same weights
    resumed = tmp_path / "ckpt" / "resumed"
    resumed.mkdir()
    for name in ("1_net_G.pth", "1_train_state.pth"):
        (resumed / name).write_bytes((run / name).read_bytes())
    args = tiny_args(tmp_path, "--continue_train", "--epoch", "1")
    args[args.index("run")] = "resumed"
    assert train.main(args) == 0
    a, b = final_weights(run), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = load_checkpoint(resumed / "latest_train_state.pth")
    assert state["epoch"] == 3 and state["total_iters"] == 3 * 8


def test_train_names_a_bad_dataroot_in_one_line(capsys):
    assert train.main(["--dataroot", "x"]) == 2
    err = capsys.readouterr().err  # the model and dataset exist now: the bad dataroot is named, in one line
    assert err.startswith("error: x:") and err.count("\n") == 1


def test_split_reader_errors(tmp_path):
    from data.base_dataset import read_split, split_key
    from util.errors import InputError

    assert split_key("sub-verse401_series0_20") == ("sub-verse401_series0", 20)
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": {"a_20": 0}, "val": {}}))
    assert read_split(path, "train") == {"a_20": 0}
    with pytest.raises(InputError, match="'val' is empty"):
        read_split(path, "val")
    path.write_text(json.dumps({"train": {"a_20": 5}}))
    with pytest.raises(InputError, match="grade 5"):
        read_split(path)


def test_shipped_verse_split_reads():
    from pathlib import Path

    from data.base_dataset import read_split

    split = read_split(Path(__file__).resolve().parents[1] / "vertebra_data.json")
    assert {k: len(v) for k, v in split.items()} == {"train": 729, "val": 365, "test": 366}


def test_state_mismatch_names_missing_unexpected_and_reshaped_tensors():
    own = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4), "b": torch.zeros(2)}
    assert state_mismatch(own, dict(own)) == ""
    saved = {"a.weight": torch.zeros(8, 3), "a.bias": torch.zeros(4), "c": torch.zeros(1)}
    assert state_mismatch(own, saved) == (
        "1 tensors missing (first b); 1 unexpected (first c); "
        "1 of another shape (first a.weight: saved (8, 3), network (4, 3))"
    )
    assert state_mismatch(own, [1, 2]) == "not a state dict (a list)"


def copy_checkpoints(run, to, names):
    to.mkdir()
    for name in names:
        (to / name).write_bytes((run / name).read_bytes())


def resumed_args(tmp_path, name, *extra):
    args = tiny_args(tmp_path, "--continue_train", *extra)
    args[args.index("run")] = name
    return args


@pytest.mark.parametrize("threads", ["0", "1"])
def test_mid_epoch_saves_carry_a_train_state_and_resume_exactly(tmp_path, threads):
    # 8 samples at batch 2: 4 iterations an epoch; a save after 6, 12 and 18 samples (mid-epoch)
    extra = ["--save_latest_freq", "6", "--save_by_iter", "--num_threads", threads]
    assert train.main(tiny_args(tmp_path, *extra)) == 0
    run = tmp_path / "ckpt" / "run"
    for n, (done, batches) in {6: (0, 3), 12: (1, 2), 18: (2, 1)}.items():
        state = load_checkpoint(run / f"iter_{n}_train_state.pth")
        assert (state["epoch"], state["batches_done"], state["total_iters"]) == (done, batches, n)
    # 6: in the run's first epoch (the loader's workers start in it); 12: in a later one
    for n in (6, 12):
        name = f"resumed_{n}"
        copy_checkpoints(run, tmp_path / "ckpt" / name, [f"iter_{n}_net_G.pth", f"iter_{n}_train_state.pth"])
        assert train.main(resumed_args(tmp_path, name, *extra, "--load_iter", str(n))) == 0
        a, b = final_weights(run), final_weights(tmp_path / "ckpt" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), n
        state = load_checkpoint(tmp_path / "ckpt" / name / "latest_train_state.pth")
        assert state["epoch"] == 3 and state["total_iters"] == 3 * 8 and state["batches_done"] == 0


def crash_mid_epoch(tmp_path, monkeypatch, *extra) -> None:
    """Run "crashed" (tiny_args and ``extra``), crashing in its 7th iteration (epoch 2)."""
    from tests.fixtures.tiny_model import TinyModel

    args = resumed_args(tmp_path, "crashed", *extra)
    args.remove("--continue_train")
    step, calls = TinyModel.optimize_parameters, []

    def crash_at_seven(self):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated crash")
        step(self)

    monkeypatch.setattr(TinyModel, "optimize_parameters", crash_at_seven)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.main(args)
    monkeypatch.setattr(TinyModel, "optimize_parameters", step)


def test_a_crash_after_a_mid_epoch_latest_save_resumes_exactly(tmp_path, monkeypatch):
    assert train.main(tiny_args(tmp_path)) == 0
    straight = final_weights(tmp_path / "ckpt" / "run")
    # the same run, crashing in its 7th iteration (epoch 2), after a latest save at 12 samples
    extra = ["--save_latest_freq", "12"]
    crash_mid_epoch(tmp_path, monkeypatch, *extra)
    crashed = tmp_path / "ckpt" / "crashed"
    state = load_checkpoint(crashed / "latest_train_state.pth")
    assert (state["epoch"], state["batches_done"], state["total_iters"]) == (1, 2, 12)
    assert train.main(resumed_args(tmp_path, "crashed", *extra, "--epoch", "latest")) == 0
    b = final_weights(crashed)
    assert all(torch.equal(straight[k], b[k]) for k in straight)


def linear_schedule(epoch_count):
    from models.schedulers import get_scheduler

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    opt = argparse.Namespace(lr_policy="linear", epoch_count=epoch_count, n_epochs=200, n_epochs_decay=800)
    return optimizer, get_scheduler(optimizer, opt)


def test_linear_schedule_resumed_with_an_epoch_count_is_the_straight_runs():
    optimizer, scheduler = linear_schedule(1)
    for _ in range(300):
        optimizer.step()
        scheduler.step()
    straight_lr = optimizer.param_groups[0]["lr"]
    assert straight_lr == pytest.approx(2e-4 * (1 - 101 / 801))  # epoch 301
    # pix2pix's habit: --continue_train --epoch_count 301; the restored schedule must not add it again
    resumed_opt, resumed = linear_schedule(301)
    resumed_opt.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for _ in range(5):
        assert resumed_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        for o, s in ((optimizer, scheduler), (resumed_opt, resumed)):
            o.step()
            s.step()
    # a fresh run started at --epoch_count 301 (no train state) is on the same curve
    fresh, _ = linear_schedule(301)
    assert fresh.param_groups[0]["lr"] == straight_lr


@pytest.mark.parametrize("old_state", [False, True])
def test_continue_train_with_epoch_count_keeps_the_straight_learning_rate(tmp_path, old_state):
    assert train.main(tiny_args(tmp_path)) == 0  # epochs 1-3, the last one decayed
    run = tmp_path / "ckpt" / "run"
    resumed = tmp_path / "ckpt" / "resumed"
    copy_checkpoints(run, resumed, ["1_net_G.pth", "1_train_state.pth"])
    if old_state:  # a train state from before the schedule kept its first epoch
        state = load_checkpoint(resumed / "1_train_state.pth")
        for saved in state["schedulers"]:
            del saved["epoch_count"]
        save_checkpoint(state, resumed / "1_train_state.pth")
    assert train.main(resumed_args(tmp_path, "resumed", "--epoch", "1", "--epoch_count", "2")) == 0
    a, b = final_weights(run), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for d in (run, resumed):  # the rate for epoch 3, halfway down the decay
        state = load_checkpoint(d / "2_train_state.pth")
        assert state["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5), d.name


def test_option_changes_names_each_differing_option_as_saved_and_now():
    saved = {"lr": 0.001, "blocks": [1, 1], "gpu_ids": [0], "max_dataset_size": "inf", "sync_bn": False}
    now = argparse.Namespace(
        lr=0.002, blocks=(1, 1), gpu_ids=[], max_dataset_size=float("inf"), sync_bn=None, new=3
    )
    # tuples as the JSON holds them, inf as saved and None (decided when the run starts) are no
    # change; an option the saved run lacks is one (its code did whatever it did before the option
    # existed); the ignored names are not compared
    lacks = "--new not recorded there (saved before the option existed), 3 now"
    assert option_changes(saved, now, ignore=("gpu_ids", "new")) == ["--lr 0.001 there, 0.002 now"]
    assert option_changes(saved, now, ignore=("gpu_ids",)) == ["--lr 0.001 there, 0.002 now", lacks]
    assert option_changes(saved, now) == ["--gpu_ids [0] there, [] now", "--lr 0.001 there, 0.002 now", lacks]


def test_a_mid_epoch_save_resumed_with_another_batch_size_is_refused(tmp_path, monkeypatch, capsys):
    """The train state counts the epoch's finished batches: another --batch_size skipped other
    samples than were trained, silently."""
    crash_mid_epoch(tmp_path, monkeypatch, "--save_latest_freq", "12")
    opt_json = (tmp_path / "ckpt" / "crashed" / "opt.json").read_text()
    resumed = resumed_args(tmp_path, "crashed", "--save_latest_freq", "12", "--epoch", "latest")
    resumed[resumed.index("--batch_size") + 1] = "4"
    capsys.readouterr()
    assert train.main(resumed) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ") and "with --batch_size 2 on 1 process(es)" in err and err.count("\n") == 1
    )
    assert (tmp_path / "ckpt" / "crashed" / "opt.json").read_text() == opt_json


def test_a_resume_with_other_learning_options_says_so(tmp_path, capsys):
    assert train.main(tiny_args(tmp_path)) == 0
    capsys.readouterr()
    assert train.main(resumed_args(tmp_path, "run", "--lr", "0.5", "--n_epochs", "3")) == 0
    warned = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: --continue_train")]
    assert len(warned) == 1 and "--lr 0.01 there, 0.5 now" in warned[0], warned  # --n_epochs may change


def test_validation_records_of_another_run_or_later_epochs_are_dropped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "val_metrics.json").write_text(json.dumps([{"epoch": 1}, {"epoch": 3}, {"epoch": 2}]))
    train.trim_validation_history(run, 2)
    assert json.loads((run / "val_metrics.json").read_text()) == [{"epoch": 1}, {"epoch": 2}]
    train.trim_validation_history(run, 0)  # a fresh run of the same name
    assert not (run / "val_metrics.json").exists()

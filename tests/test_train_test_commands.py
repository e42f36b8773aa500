"""train.py then test.py for healthivert and pix2pix, and exact resume (2 + 2 iterations = 4)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import train
from util.checkpoint import load_checkpoint

# test.py by its path: the name "test" is also the standard library's test package
_spec = importlib.util.spec_from_file_location("test_script", Path(__file__).resolve().parents[1] / "test.py")
test_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(test_script)

DATA = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--crop_size", "32", "--gpu_ids", "-1"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_args(tmp_path, model, name, *extra):
    return [
        *DATA,
        "--model",
        model,
        "--name",
        name,
        "--checkpoints_dir",
        str(tmp_path / "ckpt"),
        "--ngf",
        "8",
        "--ndf",
        "8",
        "--num_threads",
        "0",
        "--batch_size",
        "2",
        "--display_id",
        "0",
        *extra,
    ]


@pytest.mark.parametrize("model", ["healthivert", "pix2pix"])
def test_three_iterations_then_test_script(tmp_path, model, capsys):
    # 6 samples at batch 2 = 3 iterations in one epoch, validated at its end
    args = train_args(tmp_path, model, "run", "--n_epochs", "1", "--n_epochs_decay", "0")
    args += ["--max_dataset_size", "6", "--val_freq", "1", "--val_phase", "val", "--max_val_samples", "2"]
    assert train.main(args) == 0
    run = tmp_path / "ckpt" / "run"
    for name in ("latest_net_G.pth", "latest_net_D.pth", "opt.json", "loss_log.txt", "web/index.html"):
        assert (run / name).exists(), name
    assert "(epoch: 1, iters: 6" in (run / "loss_log.txt").read_text()
    history = json.loads((run / "val_metrics.json").read_text())
    assert history[0]["epoch"] == 1 and "psnr" in history[0]
    out = capsys.readouterr().out
    assert f"trained {model} for epochs 1-1 (6 samples)" in out
    results = tmp_path / "results"
    # the test command names no model sizes: they come from opt.json
    test_args = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--model", model, "--name", "run"]
    test_args += [
        "--checkpoints_dir",
        str(tmp_path / "ckpt"),
        "--results_dir",
        str(results),
        "--num_test",
        "2",
    ]
    test_args += ["--crop_size", "32", "--gpu_ids", "-1", "--phase", "test", "--epoch", "latest"]
    assert test_script.main(test_args) == 0
    page = results / "run" / "test_latest" / "index.html"
    assert page.exists() and "synthetic_0_s0_fake_B.png" in page.read_text()


def test_resume_two_plus_two_iterations_equals_four(tmp_path):
    # 4 samples at batch 2 = 2 iterations per epoch; 2 epochs = 4 iterations
    common = ["--max_dataset_size", "4", "--n_epochs", "1", "--n_epochs_decay", "1", "--val_freq", "0"]
    common += ["--save_epoch_freq", "1"]
    assert train.main(train_args(tmp_path, "healthivert", "straight", *common)) == 0
    run = tmp_path / "ckpt" / "straight"
    resumed = tmp_path / "ckpt" / "resumed"
    resumed.mkdir()
    for name in ("1_net_G.pth", "1_net_D.pth", "1_train_state.pth"):
        (resumed / name).write_bytes((run / name).read_bytes())
    args = train_args(tmp_path, "healthivert", "resumed", *common, "--continue_train", "--epoch", "1")
    assert train.main(args) == 0
    for net in ("G", "D"):
        a = load_checkpoint(run / f"latest_net_{net}.pth")
        b = load_checkpoint(resumed / f"latest_net_{net}.pth")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), net
    assert load_checkpoint(resumed / "latest_train_state.pth")["total_iters"] == 8

"""train.py then test.py for healthivert and pix2pix, and exact resume (2 + 2 iterations = 4)."""

import json

import pytest
import torch

import train
from tests import conftest
from util.checkpoint import load_checkpoint

test_script = conftest.test_script()

DATA = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--crop_size", "32", "--gpu_ids", "-1"]


pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture(scope="module")
def trained_pix2pix(tmp_path_factory):
    """A pix2pix run of one iteration (its checkpoints folder), for the test-script cases below."""
    tmp_path = tmp_path_factory.mktemp("p2p")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    args = train_args(tmp_path, "pix2pix", "run", "--n_epochs", "1", "--n_epochs_decay", "0")
    assert train.main([*args, "--max_dataset_size", "2", "--val_freq", "0"]) == 0
    torch.set_num_threads(before)
    return tmp_path / "ckpt"


def script_args(ckpt, results, *extra):
    args = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--model", "pix2pix", "--name", "run"]
    args += ["--checkpoints_dir", str(ckpt), "--results_dir", str(results), "--num_test", "2"]
    return args + ["--crop_size", "32", "--gpu_ids", "-1", "--phase", "test", *extra]


def test_load_iter_names_the_results_folder_and_page(trained_pix2pix, tmp_path):
    run = trained_pix2pix / "run"
    for net in ("G", "D"):
        (run / f"iter_7_net_{net}.pth").write_bytes((run / f"latest_net_{net}.pth").read_bytes())
    assert test_script.main(script_args(trained_pix2pix, tmp_path, "--load_iter", "7")) == 0
    page = tmp_path / "run" / "test_iter_7" / "index.html"
    assert page.exists() and "Epoch = iter_7" in page.read_text()
    assert not (tmp_path / "run" / "test_latest").exists()
    assert test_script.main(script_args(trained_pix2pix, tmp_path, "--epoch", "latest")) == 0
    assert "Epoch = latest" in (tmp_path / "run" / "test_latest" / "index.html").read_text()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_sample_leaves_no_partial_results(trained_pix2pix, tmp_path, capsys, monkeypatch, workers):
    from tests.fixtures.synthetic_vertebra import SyntheticVertebra
    from util.errors import input_error

    good = SyntheticVertebra.__getitem__

    def getitem(self, index):  # the aligned datasets read crops and CAM maps here, lazily
        if index == 1:
            raise input_error("/data/heatmap/p1_20.nii.gz", "CAM map contains NaN")
        return good(self, index)

    results = tmp_path / "results"
    args = script_args(trained_pix2pix, results, "--num_threads", str(workers))
    monkeypatch.setattr(SyntheticVertebra, "__getitem__", getitem)
    capsys.readouterr()
    assert test_script.main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: /data/heatmap/p1_20.nii.gz: CAM map contains NaN\n"
    assert not results.exists()  # the folders this run made are gone too

    # an earlier complete result stays as it was when the rerun fails, and is replaced when it succeeds
    monkeypatch.setattr(SyntheticVertebra, "__getitem__", good)
    assert test_script.main(args) == 0
    page = results / "run" / "test_latest" / "index.html"
    before = sorted(p.name for p in page.parent.rglob("*"))
    assert "synthetic_1_s1_fake_B.png" in before
    (page.parent / "images" / "stale.png").write_bytes(b"")
    monkeypatch.setattr(SyntheticVertebra, "__getitem__", getitem)
    assert test_script.main(args) == 2
    assert sorted(p.name for p in page.parent.rglob("*")) == sorted([*before, "stale.png"])
    assert [p.name for p in (results / "run").iterdir()] == ["test_latest"]  # no hidden leftovers
    monkeypatch.setattr(SyntheticVertebra, "__getitem__", good)
    assert test_script.main(args) == 0
    assert sorted(p.name for p in page.parent.rglob("*")) == before
    assert [p.name for p in (results / "run").iterdir()] == ["test_latest"]

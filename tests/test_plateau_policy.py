"""--lr_policy plateau: what it watches (--plateau_metric), in which direction, how often, and that
a resume keeps its record. The policy used to step on a constant 0 and cut the rate every 6 epochs."""

import argparse
import json
from pathlib import Path

import pytest
import torch

import train
import util.visualizer
from models.base_model import BaseModel
from models.schedulers import get_scheduler
from tests.fixtures.tiny_model import TinyModel
from tests.test_cycle_gan import _unit_model as cycle_gan_model
from tests.test_distributed import spawn, torchrun_env
from tests.test_framework import copy_checkpoints, tiny_args
from tests.test_healthivert_model import batch as healthivert_batch
from tests.test_healthivert_model import model_for as healthivert_model
from tests.test_train_test_drivers import pix2pix_args
from util import distributed
from util.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_loss_curves(monkeypatch):
    """Runs of many one-iteration epochs: drawing the loss curve each epoch would be most of the time."""
    monkeypatch.setattr(util.visualizer, "save_loss_curves", lambda *args, **kwargs: None)


@pytest.fixture
def fed(monkeypatch):
    """Each epoch's (metric handed to update_learning_rate, learning rate after it), in order."""
    calls = []
    update = BaseModel.update_learning_rate

    def record(self, metric=None):
        lr = update(self, metric)
        calls.append((metric, lr))
        return lr

    monkeypatch.setattr(BaseModel, "update_learning_rate", record)
    return calls


# --- the schedule on known metric sequences ---------------------------------------------------------


def rates(values, mode="min"):
    """The learning rate after each step of the plateau scheduler (initial rate 1) on ``values``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(optimizer, argparse.Namespace(lr_policy="plateau"), mode)
    out = []
    for value in values:
        scheduler.step(value)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_a_falling_metric_never_cuts_the_rate():
    assert rates([10 * 0.95**k for k in range(30)]) == [1.0] * 30
    # a negative loss (hinge, WGAN) falling by 5 % of its size is improving too
    assert rates([-(1.05**k) for k in range(30)]) == [1.0] * 30


def test_a_flat_metric_cuts_the_rate_by_0_2_after_patience_plus_one_epochs():
    # the first step sets the best value; the 6th epoch without a 1 % gain after it cuts, then again
    assert rates([5.0] * 13) == pytest.approx([1.0] * 6 + [0.2] * 6 + [0.04])
    # noise within 1 % of the best value is no gain
    assert rates([5.0, 4.96, 5.03, 4.97, 4.99, 4.96, 4.98]) == pytest.approx([1.0] * 6 + [0.2])
    # negative and flat: PyTorch's relative threshold (a < best * 0.99) took it for a gain every epoch
    assert rates([-5.0] * 7) == pytest.approx([1.0] * 6 + [0.2])


def test_a_higher_is_better_metric_that_rises_does_not_cut_the_rate():
    rising = [0.5 + 0.02 * k for k in range(12)]
    assert rates(rising, mode="max") == [1.0] * 12
    assert rates(rising, mode="min")[-1] < 1.0  # watched the wrong way, it would
    assert rates([0.7] * 7, mode="max") == pytest.approx([1.0] * 6 + [0.2])


def test_the_models_declare_their_generator_losses_and_validation_directions(tmp_path):
    model = healthivert_model(tmp_path / "hv", "--lr_policy", "plateau", "--plateau_metric", "ssim")
    model.setup(model.opt)
    model.set_input(healthivert_batch([0, 1]))
    model.optimize_parameters()
    # every term of the generator objective, and no discriminator's
    assert model.generator_loss_names() == ["G_GAN", "G_L1", "G_Dice", "coarse_Dice", "edge", "height"]
    assert float(model.generator_loss()) == pytest.approx(float(model.loss_G.detach()), rel=1e-6)
    assert set(model.validation_metrics()) == set(model.validation_higher_is_better)
    assert model.schedulers[0].mode == "max"
    model.opt.plateau_metric = "height_error_mm"
    assert model.plateau_mode() == "min"
    cycle_gan = cycle_gan_model(tmp_path / "cg")  # with a jointly trained shape extractor
    assert cycle_gan.generator_loss_names() == [
        *("G_A", "cycle_A", "idt_A", "G_B", "cycle_B", "idt_B"),
        *("shape", "G_S"),  # not D_A, D_B, D_S, nor the extractor's S_seg
    ]


# --- train.py ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--lr_policy", "plateau", "--plateau_metric", "ssmi"],
            "unknown --plateau_metric 'ssmi' for --model pix2pix; use loss_G (the epoch's mean "
            "generator training loss) or a validation metric: ssim | psnr",
        ),
        (["--plateau_metric", "ssmi"], "unknown --plateau_metric 'ssmi'"),  # a typo whatever the policy
        (
            ["--lr_policy", "plateau", "--plateau_metric", "ssim"],  # pix2pix_args: --val_freq 0
            "--plateau_metric ssim is a validation metric: it needs --val_freq > 0",
        ),
    ],
)
def test_a_plateau_metric_train_cannot_watch_is_one_error_line_at_start(tmp_path, capsys, extra, message):
    ckpt = tmp_path / "ckpt"
    assert train.main(pix2pix_args(ckpt, "run", *extra)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1
    assert "end of epoch" not in captured.out and not (ckpt / "run").exists()


def test_the_fed_metric_is_the_epochs_mean_generator_loss(tmp_path, monkeypatch, fed, capsys):
    from models.pix2pix_model import Pix2PixModel

    logged = []
    step = Pix2PixModel.optimize_parameters

    def step_and_log(self):
        step(self)
        losses = self.get_current_losses()
        logged.append(losses["G_GAN"] + losses["G_L1"])  # pix2pix's generator objective, no D term

    monkeypatch.setattr(Pix2PixModel, "optimize_parameters", step_and_log)
    # 2 iterations an epoch, printed only once a run: the mean is over all of them
    extra = ["--max_dataset_size", "4", "--n_epochs", "2", "--lr_policy", "plateau", "--print_freq", "100"]
    assert train.main(pix2pix_args(tmp_path / "ckpt", "run", *extra)) == 0
    assert len(logged) == 4 and len(fed) == 2
    for epoch, (metric, _) in enumerate(fed):
        assert metric == pytest.approx(sum(logged[2 * epoch : 2 * epoch + 2]) / 2, rel=1e-6)
        assert metric != pytest.approx(logged[2 * epoch + 1], rel=1e-3)  # not only the last iteration's
    out = capsys.readouterr().out
    assert f"learning rate 0.0002000 -> 0.0002000, plateau loss_G {fed[-1][0]:.6g}" in out


def epoch_loss_worker(rank: int, port: int, out: str) -> None:
    torchrun_env(rank, 2, port)
    assert distributed.init(use_cuda=False)
    try:
        loss = train.EpochLoss(torch.device("cpu"))
        for value in [1.0, 2.0] if rank == 0 else [6.0]:
            loss.add(torch.tensor(value))
        Path(out, f"rank{rank}.json").write_text(json.dumps(loss.mean()))
    finally:
        distributed.shutdown()


@pytest.mark.slow  # two processes that import torch: about 10 s
def test_under_torchrun_the_loss_mean_is_over_every_ranks_iterations(tmp_path):
    spawn(epoch_loss_worker, str(tmp_path))
    # (1 + 2 + 6) / 3 on both ranks, so both step their schedulers alike (alone: 1.5 and 6)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [3.0, 3.0]


def scored_tiny_model(monkeypatch, scores):
    """TinyModel with one validation metric, ``score`` (more is better): ``scores[k]`` at the kth
    validation (one batch each)."""
    calls = []

    def validation_metrics(self):
        calls.append(1)
        return {"score": torch.full((self.real_A.shape[0],), scores[len(calls) - 1])}

    monkeypatch.setattr(TinyModel, "validation_metrics", validation_metrics, raising=False)
    monkeypatch.setattr(TinyModel, "validation_higher_is_better", {"score": True})


def scored_args(tmp_path, name, epochs, val_freq):
    args = tiny_args(tmp_path, "--lr_policy", "plateau", "--plateau_metric", "score", "--no_html")
    args += ["--max_dataset_size", "2", "--max_val_samples", "2", "--val_freq", str(val_freq)]
    args[args.index("--n_epochs") + 1], args[args.index("--n_epochs_decay") + 1] = str(epochs), "0"
    args[args.index("run")] = name
    return args


@pytest.mark.usefixtures("no_loss_curves")
def test_a_rising_validation_score_keeps_the_rate_and_a_flat_one_cuts_it(tmp_path, monkeypatch, fed):
    scored_tiny_model(monkeypatch, [0.5 + 0.02 * k for k in range(8)])
    assert train.main(scored_args(tmp_path, "rising", 8, 1)) == 0
    assert [lr for _, lr in fed] == [0.01] * 8
    fed.clear()
    scored_tiny_model(monkeypatch, [0.7] * 8)
    assert train.main(scored_args(tmp_path, "flat", 8, 1)) == 0
    assert [lr for _, lr in fed] == pytest.approx([0.01] * 6 + [0.002] * 2)
    assert [metric for metric, _ in fed] == pytest.approx([0.7] * 8)


@pytest.mark.usefixtures("no_loss_curves")
def test_a_validation_metric_steps_only_when_validating(tmp_path, monkeypatch, fed, capsys):
    scored_tiny_model(monkeypatch, [0.7] * 7)
    # validation every 2nd epoch: 7 flat validations in 14 epochs, the patience counts validations
    assert train.main(scored_args(tmp_path, "run", 14, 2)) == 0
    assert [metric for metric, _ in fed] == [None, pytest.approx(0.7)] * 7
    assert [lr for _, lr in fed] == pytest.approx([0.01] * 13 + [0.002])
    state = load_checkpoint(tmp_path / "ckpt" / "run" / "latest_train_state.pth")
    assert state["schedulers"][0]["last_epoch"] == 7
    ends = [line for line in capsys.readouterr().out.splitlines() if line.startswith("end of epoch")]
    assert ["plateau score" in line for line in ends] == [False, True] * 7
    assert ends[-1].endswith("learning rate 0.0100000 -> 0.0020000, plateau score 0.7")


# --- resuming --------------------------------------------------------------------------------------


def flat_loss_args(tmp_path, name="run", *extra):
    """The tiny model on the same 4 samples every epoch, at a rate too small to move its loss 1 %:
    the plateau record fills up, and the rate is cut after epoch 7 of 8. Two iterations an epoch; a
    save every 6 samples."""
    args = tiny_args(tmp_path, "--lr_policy", "plateau", "--max_dataset_size", "4", "--serial_batches")
    args += ["--no_html", *extra]
    args += ["--save_latest_freq", "6", "--save_by_iter"]
    args[args.index("--lr") + 1] = "1e-6"
    args[args.index("--n_epochs") + 1], args[args.index("--n_epochs_decay") + 1] = "8", "0"
    args[args.index("run")] = name
    return args


@pytest.mark.usefixtures("no_loss_curves")
def test_a_resume_keeps_the_plateau_record(tmp_path, fed):
    assert train.main(flat_loss_args(tmp_path)) == 0
    straight = list(fed)
    assert [lr for _, lr in straight] == pytest.approx([1e-6] * 6 + [2e-7] * 2)
    run = tmp_path / "ckpt" / "run"
    final = load_checkpoint(run / "latest_train_state.pth")["schedulers"]
    # from the end of epoch 3 (best and 2 bad epochs on record), and from the middle of epoch 2 (the
    # sum of its first iteration's loss on record): the straight run's metrics, rates and record
    for name, files, flag in [
        ("from_3", ["3_net_G.pth", "3_train_state.pth"], ["--epoch", "3"]),
        ("from_6", ["iter_6_net_G.pth", "iter_6_train_state.pth"], ["--load_iter", "6"]),
    ]:
        copy_checkpoints(run, tmp_path / "ckpt" / name, files)
        fed.clear()
        args = flat_loss_args(tmp_path, name, "--continue_train", *flag)
        assert train.main(args) == 0
        assert fed == straight[-len(fed) :], name
        resumed = load_checkpoint(tmp_path / "ckpt" / name / "latest_train_state.pth")["schedulers"]
        assert resumed == final, name


@pytest.mark.usefixtures("no_loss_curves")
def test_a_train_state_of_another_plateau_metric_starts_the_record_afresh(tmp_path, fed, caplog):
    assert train.main(flat_loss_args(tmp_path)) == 0
    run, resumed = tmp_path / "ckpt" / "run", tmp_path / "ckpt" / "old"
    copy_checkpoints(run, resumed, ["3_net_G.pth", "3_train_state.pth"])
    # saved before --plateau_metric existed: its record is of the constant 0 the policy was fed
    state = load_checkpoint(resumed / "3_train_state.pth")
    del state["options"]["plateau_metric"]
    state["schedulers"][0].update(best=0.0, num_bad_epochs=5)
    save_checkpoint(state, resumed / "3_train_state.pth")
    fed.clear()
    assert train.main(flat_loss_args(tmp_path, "old", "--continue_train", "--epoch", "3")) == 0
    assert "the plateau record starts afresh" in caplog.text
    # epochs 4-8 on a fresh record: no cut (the stale one would have cut after epoch 4)
    assert [lr for _, lr in fed] == [1e-6] * 5
    assert load_checkpoint(resumed / "latest_train_state.pth")["schedulers"][0]["last_epoch"] == 5

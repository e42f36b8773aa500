"""--continue_train with another --lr_policy, or another --val_freq, than the train state's.

A train state's scheduler state belongs to the policy that saved it: loaded into another policy's
scheduler it raised (LambdaLR: ``KeyError: 'lr_lambdas'``) or was taken in silently (StepLR,
CosineAnnealingLR, ReduceLROnPlateau kept the other's attributes and step count). Another policy now
starts afresh at the resumed epoch, with one warning; the same policy resumes as before.

The runs: rate 0.01, ``--n_epochs 2 --n_epochs_decay 2`` (4 epochs), ``--lr_decay_iters 1``, two
iterations an epoch, saved after every epoch and resumed after epoch 1, so epoch 2 is the first the
new policy sets the rate of.
"""

import logging
import math

import pytest
import torch

import train
from models import create_model
from models.schedulers import get_scheduler
from options.train_options import TrainOptions
from tests.test_framework import copy_checkpoints, final_weights, tiny_args
from tests.test_plateau_policy import (
    no_loss_curves,  # noqa: F401 (a fixture)
    scored_args,
    scored_tiny_model,
)
from tests.test_train_test_drivers import pix2pix_args
from util.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "no_loss_curves")

POLICIES = ("linear", "step", "plateau", "cosine")
#: the rate after epoch 1 of each policy's run: linear 1 (its decay starts after epoch 2), step
#: x0.1, cosine over T_max = n_epochs = 2 halfway, plateau unchanged (its patience is 5)
SAVED_RATE = {"linear": 0.01, "step": 1e-3, "cosine": 5e-3, "plateau": 0.01}
#: the rates of epochs 2, 3, 4 of a fresh run of each closed-form policy started at epoch 2 (what a
#: resume after epoch 1 that switches to it runs): linear is measured in the run's epochs (constant
#: up to epoch 2, then 1 - (epoch - 2) / 3), step and cosine count from the resumed epoch
FRESH_FROM_2 = {
    "linear": [0.01, 0.01 * 2 / 3, 0.01 / 3],
    "step": [0.01, 1e-3, 1e-4],
    "cosine": [0.01, 5e-3, 0.0],
}


def schedule_args(tmp_path, name, policy, *extra):
    args = tiny_args(tmp_path, "--lr_policy", policy, "--lr_decay_iters", "1", "--max_dataset_size", "4")
    args += ["--no_html", *extra]
    args[args.index("--n_epochs_decay") + 1] = "2"
    args[args.index("run")] = name
    return args


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A folder whose ``ckpt`` holds one 4-epoch run per policy, named after it."""
    tmp_path = tmp_path_factory.mktemp("schedules")
    for policy in POLICIES:
        assert train.main(schedule_args(tmp_path, policy, policy)) == 0
    return tmp_path


def copy_epoch(run, to, epoch):
    """Copy epoch ``epoch``'s network and train state of ``run`` into a new run folder ``to``."""
    to.parent.mkdir(parents=True, exist_ok=True)
    copy_checkpoints(run, to, [f"{epoch}_net_G.pth", f"{epoch}_train_state.pth"])


def resumed_model(args: list[str]):
    """The model of a ``--continue_train`` command, set up (its train state loaded) as train.py does."""
    opt = TrainOptions().parse(args)
    model = create_model(opt)
    model.setup(opt)
    return model


def rates(model) -> list[float]:
    return [group["lr"] for optimizer in model.optimizers for group in optimizer.param_groups]


def scheduler_rates(model) -> list[float]:
    """What each scheduler says the rate of the next epoch is."""
    return [lr for scheduler in model.schedulers for lr in scheduler._last_lr]


def switch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "--lr_policy" in r.getMessage()]


@pytest.mark.parametrize(("before", "after"), [(a, b) for a in POLICIES for b in POLICIES if a != b])
def test_another_policy_starts_afresh_at_the_resumed_epoch(saved, before, after, caplog):
    # another --lr than the saved run's 0.01: the fresh schedule must take this command's, not the
    # saved optimiser state's (initial_lr, or a plateau state's rate)
    args = schedule_args(saved, before, after, "--continue_train", "--epoch", "1", "--lr", "0.02")
    with caplog.at_level(logging.WARNING):
        model = resumed_model(args)
    [warning] = switch_warnings(caplog)
    assert warning.startswith(f"1_train_state.pth was saved with --lr_policy {before}, this run has {after}")
    expected = SAVED_RATE[before] if after == "plateau" else 2 * FRESH_FROM_2[after][0]
    assert rates(model) == pytest.approx([expected])
    assert scheduler_rates(model) == rates(model)  # the scheduler and the optimiser agree
    [scheduler], [group] = model.schedulers, model.optimizers[0].param_groups
    if after == "plateau":  # an empty record, nothing of the old schedule's state
        assert (scheduler.best, scheduler.num_bad_epochs, scheduler.last_epoch) == (math.inf, 0, 0)
        assert "initial_lr" not in group
    else:  # the fresh run's state: its first step, on this command's --lr
        assert scheduler.last_epoch == 0 and scheduler.base_lrs == [group["initial_lr"]] == [0.02]
    if after == "linear":  # train.py's first epoch of the resumed run; the options stay the command's
        assert scheduler.epoch_count == 2 and model.opt.epoch_count == 1
    # nothing of the old scheduler's state: the keys of a scheduler of the new policy only
    fresh = get_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01), model.opt)
    assert set(scheduler.state_dict()) == set(fresh.state_dict())


def test_a_plateau_taking_over_a_spent_rate_says_the_run_will_not_learn(saved, caplog):
    """Cosine anneals to 0 over --n_epochs (2): switched to plateau after epoch 2 it would keep 0."""
    args = schedule_args(saved, "cosine", "plateau", "--continue_train", "--epoch", "2")
    with caplog.at_level(logging.WARNING):
        model = resumed_model(args)
    assert rates(model) == pytest.approx([0.0])
    assert any("this run will not change the weights" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a rate left to lower: no such warning
        resumed_model(schedule_args(saved, "cosine", "plateau", "--continue_train", "--epoch", "1"))
    assert not any("will not change" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("linear", "plateau"),
        ("plateau", "linear"),
        ("linear", "cosine"),
        ("cosine", "linear"),
        ("step", "plateau"),
        ("plateau", "step"),
    ],
)
def test_a_switched_run_trains_on_the_new_schedule(saved, tmp_path, before, after):
    name = f"{before}_to_{after}"
    copy_epoch(saved / "ckpt" / before, tmp_path / "ckpt" / name, 1)
    assert train.main(schedule_args(tmp_path, name, after, "--continue_train", "--epoch", "1")) == 0
    run = tmp_path / "ckpt" / name
    states = {epoch: load_checkpoint(run / f"{epoch}_train_state.pth") for epoch in (2, 3, 4)}
    after_epochs = [states[e]["optimizers"][0]["param_groups"][0]["lr"] for e in (2, 3)]  # of epochs 3, 4
    if after == "plateau":
        assert after_epochs == pytest.approx([SAVED_RATE[before]] * 2)
        assert states[4]["schedulers"][0]["last_epoch"] == 3  # stepped in epochs 2-4 only
        return
    assert after_epochs == pytest.approx(FRESH_FROM_2[after][1:])
    # exactly a fresh run of the policy started at epoch 2 (no train state): same schedule state
    assert train.main(schedule_args(tmp_path, "fresh", after, "--epoch_count", "2")) == 0
    fresh = tmp_path / "ckpt" / "fresh"
    for epoch in (2, 3, 4):
        assert (
            states[epoch]["schedulers"] == load_checkpoint(fresh / f"{epoch}_train_state.pth")["schedulers"]
        )


def test_a_switched_run_resumes_exactly_on_its_new_policy(saved, tmp_path, caplog):
    copy_epoch(saved / "ckpt" / "plateau", tmp_path / "ckpt" / "switched", 1)
    assert train.main(schedule_args(tmp_path, "switched", "linear", "--continue_train", "--epoch", "1")) == 0
    switched = tmp_path / "ckpt" / "switched"
    copy_epoch(switched, tmp_path / "ckpt" / "again", 3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert train.main(schedule_args(tmp_path, "again", "linear", "--continue_train", "--epoch", "3")) == 0
    assert not switch_warnings(caplog)  # linear saved, linear resumed
    again = tmp_path / "ckpt" / "again"
    a, b = final_weights(switched), final_weights(again)
    assert all(a[k].equal(b[k]) for k in a)
    final = [load_checkpoint(d / "4_train_state.pth") for d in (switched, again)]
    assert final[0]["schedulers"] == final[1]["schedulers"]
    assert final[0]["optimizers"][0]["param_groups"] == final[1]["optimizers"][0]["param_groups"]


@pytest.mark.parametrize(
    ("before", "after"), [("step", "plateau"), ("plateau", "linear"), ("cosine", "cosine")]
)
def test_a_train_state_saved_without_its_policy_is_told_by_its_scheduler_state(
    saved, tmp_path, before, after, caplog
):
    resumed = tmp_path / "ckpt" / "old"
    copy_epoch(saved / "ckpt" / before, resumed, 1)
    state = load_checkpoint(resumed / "1_train_state.pth")
    del state["options"]["lr_policy"]
    save_checkpoint(state, resumed / "1_train_state.pth")
    with caplog.at_level(logging.WARNING):
        model = resumed_model(schedule_args(tmp_path, "old", after, "--continue_train", "--epoch", "1"))
    if before == after:  # loaded as before: the saved step count and rate
        assert not switch_warnings(caplog)
        assert model.schedulers[0].last_epoch == 1 and rates(model) == pytest.approx([SAVED_RATE[before]])
    else:
        [warning] = switch_warnings(caplog)
        assert f"--lr_policy {before}, this run has {after}" in warning
        assert rates(model) == scheduler_rates(model)


def test_a_model_of_two_optimisers_warns_once_and_sets_both(tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    assert train.main(pix2pix_args(ckpt, "run", "--lr_policy", "step", "--lr_decay_iters", "1")) == 0
    args = pix2pix_args(ckpt, "run", "--lr_policy", "linear", "--continue_train", "--epoch", "1")
    args += ["--n_epochs", "1", "--n_epochs_decay", "1", "--lr", "0.001"]  # later flags win
    with caplog.at_level(logging.WARNING):
        model = resumed_model(args)
    assert len(switch_warnings(caplog)) == 1 and len(model.optimizers) == 2
    # linear at epoch 2 of 1 + 1: 1 - 1 / 2 of this command's --lr
    assert rates(model) == scheduler_rates(model) == pytest.approx([0.0005, 0.0005])


# --- --val_freq and a plateau record of validations ---------------------------------------------


@pytest.fixture
def scored_run(tmp_path, monkeypatch):
    """A run whose plateau policy watched a validation score every epoch (--val_freq 1)."""
    scored_tiny_model(monkeypatch, [0.7] * 4)
    assert train.main(scored_args(tmp_path, "run", 2, 1)) == 0
    return tmp_path


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        (["--val_freq", "2"], True),
        (["--val_freq", "1"], False),
        (["--val_freq", "2", "--plateau_metric", "loss_G"], False),  # another metric: a fresh record
        (["--val_freq", "2", "--lr_policy", "linear"], False),  # no plateau record at all
    ],
)
def test_another_val_freq_under_a_validation_plateau_is_warned_of(scored_run, extra, warned, caplog):
    args = scored_args(scored_run, "run", 2, 1) + ["--continue_train", "--epoch", "2", *extra]
    with caplog.at_level(logging.WARNING):
        model = resumed_model(args)
    warnings = [r.getMessage() for r in caplog.records if "--val_freq" in r.getMessage()]
    assert len(warnings) == warned
    if warned:
        assert warnings[0].startswith(
            "2_train_state.pth was saved with --val_freq 1, this run has --val_freq 2"
        )
        assert model.schedulers[0].num_bad_epochs == 1  # the record is kept all the same


def test_another_val_freq_under_a_training_loss_plateau_is_no_matter(saved, caplog):
    args = schedule_args(saved, "plateau", "plateau", "--val_freq", "3", "--continue_train", "--epoch", "2")
    with caplog.at_level(logging.WARNING):
        resumed_model(args)
    assert not [r for r in caplog.records if "--val_freq" in r.getMessage()]


def _optimiser(lr=2e-4):
    return torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_cosine_anneals_to_zero_over_n_epochs_and_stays_there():
    """PyTorch's CosineAnnealingLR is periodic: the --n_epochs_decay epochs after --n_epochs climbed
    back to the full rate (2e-4, 1e-4, 0, 1e-4, 2e-4 over 2 + 3 epochs)."""
    from models.schedulers import Cosine

    opt = _optimiser()
    sched = Cosine(opt, T_max=2, eta_min=0)
    rates = []
    for _ in range(5):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([2e-4, 1e-4, 0.0, 0.0, 0.0], abs=1e-12)


def test_a_resumed_longer_schedule_trains_its_next_epoch_at_the_new_rate():
    """Resumed with a longer schedule, the first resumed epoch ran at the rate the saved schedule
    had set (linear: 0 after a 1-epoch run; cosine: the old length, then back up)."""
    from models.schedulers import Cosine, LinearDecay

    opt = _optimiser()
    linear = LinearDecay(opt, 1, n_epochs=1, n_epochs_decay=0)
    opt.step()
    linear.step()  # epoch 1 done: the 1-epoch schedule sets 0 for an epoch 2 it does not have
    assert opt.param_groups[0]["lr"] == 0.0
    resumed = _optimiser()
    resumed.load_state_dict(opt.state_dict())
    longer = LinearDecay(resumed, 1, n_epochs=3, n_epochs_decay=0)
    longer.load_state_dict(linear.state_dict())
    assert resumed.param_groups[0]["lr"] == pytest.approx(2e-4)  # epoch 2 of a 3-epoch run

    opt = _optimiser()
    cosine = Cosine(opt, T_max=2, eta_min=0)
    opt.step()
    cosine.step()
    resumed = _optimiser()
    resumed.load_state_dict(opt.state_dict())
    longer = Cosine(resumed, T_max=4, eta_min=0)
    longer.load_state_dict(cosine.state_dict())
    assert longer.T_max == 4
    assert resumed.param_groups[0]["lr"] == pytest.approx(2e-4 * (1 + math.cos(math.pi / 4)) / 2)

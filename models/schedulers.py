"""Learning-rate schedules: linear (constant, then linear decay to zero), step, plateau, cosine.

The plateau policy watches ``--plateau_metric``: by default ``loss_G``, the epoch's mean generator
training loss (:meth:`models.base_model.BaseModel.generator_loss_names` says which logged losses
that sums), or a validation metric of the model, stepped only on the epochs that validate.

A run resumed (``--continue_train``) with the policy its train state was saved with goes on from the
saved scheduler state. One resumed with another policy cannot use that state (each policy's is its
own); the new policy starts afresh at the resumed epoch ``E`` (the one after the last finished),
as :func:`fresh_start` says for each policy:

- ``linear``, ``step``, ``cosine``: exactly as a fresh run of this command started with
  ``--epoch_count E`` (no train state): from this command's ``--lr``; ``linear`` on its curve over
  the run's epochs (``--lr`` up to epoch ``--n_epochs``, then down to zero over
  ``--n_epochs_decay``), so epoch ``E`` gets the rate a straight linear run would give it;
  ``step`` and ``cosine`` count their epochs from ``E`` (the first cut ``--lr_decay_iters``
  epochs after it; annealed to zero over ``--n_epochs`` epochs from it).
- ``plateau``: an empty record (no best value, no epochs without a gain) at the rate the run had
  when it was saved: the policy only ever lowers the rate, so it takes over where the old schedule
  left it rather than going back up to ``--lr``. After a mid-epoch save, that epoch's ``loss_G`` is
  the mean of the iterations the resumed run trains (the old policy kept no sum of the others).
"""

from __future__ import annotations

import argparse
import math

from torch.optim import Optimizer, lr_scheduler

#: ``--plateau_metric``'s default: the epoch's mean of the generator's total training loss
TRAINING_LOSS = "loss_G"


def set_rates(scheduler: lr_scheduler.LRScheduler, rates: list[float]) -> None:
    """Put ``rates`` (one per parameter group) into the scheduler's optimiser, as a step would: a
    schedule loaded from a train state sets the rate of the epoch it resumes at by its own curve."""
    for group, lr in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class LinearDecay(lr_scheduler.LambdaLR):
    """The pix2pix ``linear`` policy: the initial rate up to epoch ``n_epochs``, then a linear decay
    to zero over the next ``n_epochs_decay`` (factor ``1 - max(0, epoch - n_epochs) / (n_epochs_decay + 1)``).

    Stepped once per epoch, from the run's first epoch ``epoch_count``: the epoch of step ``k`` is
    ``k + epoch_count``. ``epoch_count`` is part of the state dict, so a resumed run (its schedulers
    restored from a train state, ``last_epoch`` counting the straight run's steps) stays on the
    straight run's curve whatever its own ``--epoch_count`` (adding that offset again counted it
    twice). The schedule's length (``n_epochs``, ``n_epochs_decay``) stays the command line's on
    loading, so a resumed run may extend it.
    """

    def __init__(self, optimizer: Optimizer, epoch_count: int, n_epochs: int, n_epochs_decay: int):
        self.epoch_count = int(epoch_count)
        self.n_epochs, self.n_epochs_decay = int(n_epochs), int(n_epochs_decay)
        super().__init__(optimizer, lr_lambda=lambda step: self.factor(step + self.epoch_count))

    def factor(self, epoch: int) -> float:
        """The learning-rate factor while training epoch ``epoch`` (1-based)."""
        return 1.0 - max(0, epoch - self.n_epochs) / float(self.n_epochs_decay + 1)

    def load_state_dict(self, state_dict: dict) -> None:
        length = self.n_epochs, self.n_epochs_decay
        super().load_state_dict(state_dict)
        self.n_epochs, self.n_epochs_decay = length
        self.set_rate()

    def set_rate(self) -> None:
        """Set the optimiser's rate to this schedule's at the current step. The restored optimiser
        holds the rate the saved schedule set for the next epoch; a resumed run whose schedule is
        longer (or shorter) trains that epoch at this command's rate."""
        factor = self.factor(self.last_epoch + self.epoch_count)
        set_rates(self, [base * factor for base in self.base_lrs])


class Plateau(lr_scheduler.ReduceLROnPlateau):
    """ReduceLROnPlateau whose relative threshold is taken of the best value's magnitude.

    PyTorch's ``rel`` mode counts ``a < best * (1 - threshold)`` as better (mode min): for a negative
    best (a hinge or WGAN generator loss) that accepts values up to 1 % worse, so the rate would
    never fall. Here a value is better when it beats ``best`` by ``threshold * |best|``; for positive
    values this is PyTorch's rule exactly. The state dict is ReduceLROnPlateau's.
    """

    def _is_better(self, a: float, best: float) -> bool:  # type: ignore[override]
        if not math.isfinite(best) or self.threshold_mode != "rel":
            return super()._is_better(a, best)
        margin = self.threshold * abs(best)
        return a < best - margin if self.mode == "min" else a > best + margin


class Cosine(lr_scheduler.CosineAnnealingLR):
    """Cosine annealing to ``eta_min`` over ``T_max`` (``--n_epochs``) epochs, then held there.

    PyTorch's CosineAnnealingLR is periodic: past ``T_max`` it climbs back to the initial rate (at
    epoch ``2 * T_max``), which the run's ``--n_epochs_decay`` further epochs reach. Here the rate is
    the closed form at ``min(step, T_max)``, and ``T_max`` stays the command line's when a saved
    state is loaded (the saved one would end a resumed, longer schedule early and climb again)."""

    def get_lr(self) -> list[float]:  # type: ignore[override]
        step = min(self.last_epoch, self.T_max)
        cos = (1 + math.cos(math.pi * step / self.T_max)) / 2
        return [self.eta_min + (base - self.eta_min) * cos for base in self.base_lrs]

    _get_closed_form_lr = get_lr

    def load_state_dict(self, state_dict: dict) -> None:
        t_max = self.T_max
        super().load_state_dict(state_dict)
        self.T_max = t_max
        set_rates(self, self.get_lr())


#: what makes each policy's scheduler state its own: a key only that policy's state dict has
_STATE_KEYS = {"linear": "lr_lambdas", "step": "step_size", "plateau": "num_bad_epochs", "cosine": "T_max"}


def policy_of_state(state_dict: dict) -> str | None:
    """The ``--lr_policy`` whose scheduler (of :func:`get_scheduler`) wrote ``state_dict``, told by
    its keys; None for a state dict of none of them."""
    found = [policy for policy, key in _STATE_KEYS.items() if key in state_dict]
    return found[0] if len(found) == 1 else None


def fresh_start(opt: argparse.Namespace, epoch: int) -> str:
    """How ``opt.lr_policy`` starts afresh at ``epoch`` when a run resumed with it was saved with
    another policy (the module docstring says why), in words for the warning that says so."""
    if opt.lr_policy == "plateau":
        return "an empty plateau record, at the rate the run had when saved"
    if opt.lr_policy == "linear":
        detail = f"constant up to epoch {opt.n_epochs}, then down to zero over {opt.n_epochs_decay} epochs"
    elif opt.lr_policy == "step":
        detail = f"x0.1 every {opt.lr_decay_iters} epochs from epoch {epoch}"
    else:
        detail = f"annealed to zero over {opt.n_epochs} epochs from epoch {epoch}"
    return f"as a fresh run from --epoch_count {epoch} with --lr {opt.lr:g}: {detail}"


def get_scheduler(optimizer: Optimizer, opt: argparse.Namespace, plateau_mode: str = "min"):
    """The scheduler ``opt.lr_policy`` names, stepped once per epoch; ``plateau_mode`` is the
    plateau metric's direction: ``min`` (a loss, an error) or ``max`` (SSIM, PSNR, Dice)."""
    if opt.lr_policy == "linear":
        return LinearDecay(optimizer, opt.epoch_count, opt.n_epochs, opt.n_epochs_decay)
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_iters, gamma=0.1)
    if opt.lr_policy == "plateau":
        return Plateau(optimizer, mode=plateau_mode, factor=0.2, threshold=0.01, patience=5)
    if opt.lr_policy == "cosine":
        return Cosine(optimizer, T_max=opt.n_epochs, eta_min=0)
    raise ValueError(f"unknown lr_policy {opt.lr_policy!r}; use linear | step | plateau | cosine")

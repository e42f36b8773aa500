"""Learning-rate schedules: linear (constant, then linear decay to zero), step, plateau, cosine."""

from __future__ import annotations

import argparse

from torch.optim import Optimizer, lr_scheduler


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


def get_scheduler(optimizer: Optimizer, opt: argparse.Namespace):
    """The scheduler ``opt.lr_policy`` names, stepped once per epoch."""
    if opt.lr_policy == "linear":
        return LinearDecay(optimizer, opt.epoch_count, opt.n_epochs, opt.n_epochs_decay)
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_iters, gamma=0.1)
    if opt.lr_policy == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)
    if opt.lr_policy == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.n_epochs, eta_min=0)
    raise ValueError(f"unknown lr_policy {opt.lr_policy!r}; use linear | step | plateau | cosine")

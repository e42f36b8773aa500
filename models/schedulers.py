"""Learning-rate schedules: linear (constant, then linear decay to zero), step, plateau, cosine."""

from __future__ import annotations

import argparse

from torch.optim import Optimizer, lr_scheduler


def get_scheduler(optimizer: Optimizer, opt: argparse.Namespace):
    """The scheduler ``opt.lr_policy`` names, stepped once per epoch."""
    if opt.lr_policy == "linear":

        def rule(epoch: int) -> float:
            return 1.0 - max(0, epoch + opt.epoch_count - opt.n_epochs) / float(opt.n_epochs_decay + 1)

        return lr_scheduler.LambdaLR(optimizer, lr_lambda=rule)
    if opt.lr_policy == "step":
        return lr_scheduler.StepLR(optimizer, step_size=opt.lr_decay_iters, gamma=0.1)
    if opt.lr_policy == "plateau":
        return lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, threshold=0.01, patience=5)
    if opt.lr_policy == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=opt.n_epochs, eta_min=0)
    raise ValueError(f"unknown lr_policy {opt.lr_policy!r}; use linear | step | plateau | cosine")

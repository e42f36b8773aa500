"""Adversarial objectives: vanilla (BCE on logits), lsgan (least squares), hinge and wgangp.

``GANLoss(mode)(prediction, target_is_real)`` gives the loss of a discriminator output against
the real or fake label; ``for_discriminator`` matters only for hinge, whose generator term is
``-mean(D(fake))``. Targets are built with the prediction's shape, dtype and device, so the loss
works under autocast and on any device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

GAN_MODES = ("vanilla", "lsgan", "hinge", "wgangp")


class GANLoss(nn.Module):
    def __init__(self, gan_mode: str = "vanilla", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise ValueError(f"unknown gan_mode {gan_mode!r}; use {' | '.join(GAN_MODES)}")
        self.gan_mode = gan_mode
        self.real_label = float(real_label)
        self.fake_label = float(fake_label)

    def forward(
        self, prediction: torch.Tensor, target_is_real: bool, for_discriminator: bool = True
    ) -> torch.Tensor:
        pred = prediction.float()
        if self.gan_mode in ("vanilla", "lsgan"):
            target = torch.full_like(pred, self.real_label if target_is_real else self.fake_label)
            if self.gan_mode == "vanilla":
                return F.binary_cross_entropy_with_logits(pred, target)
            return F.mse_loss(pred, target)
        if self.gan_mode == "hinge":
            if not for_discriminator:
                return -pred.mean()
            return F.relu(1.0 - pred).mean() if target_is_real else F.relu(1.0 + pred).mean()
        return -pred.mean() if target_is_real else pred.mean()  # wgangp


def gradient_penalty(
    netD: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0
) -> torch.Tensor:
    """WGAN-GP penalty on random interpolates of ``real`` and ``fake``: weight * (|grad D| - 1)^2."""
    alpha = torch.rand(real.shape[0], *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    out = netD(mixed)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return weight * ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()

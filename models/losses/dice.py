"""Soft Dice, per sample and then averaged over the batch (REFERENCE.md section 5.4)."""

from __future__ import annotations

import torch

DICE_SMOOTH = 1e-5


def soft_dice(probability: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Per-sample soft Dice ``(2 sum(p g) + s) / (sum(p) + sum(g) + s)``, shape (B,)."""
    p = probability.float().flatten(1)
    g = target.float().flatten(1)
    return (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``1 - mean_b dice``: 0 for identical masks, near 1 for disjoint ones."""
    return 1.0 - soft_dice(probability, target, smooth).mean()

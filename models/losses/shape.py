"""Shape-consistency loss between two shape maps (soft masks in [0, 1]).

Soft Dice in the V-Net form, ``1 - 2 sum(p q) / (sum p^2 + sum q^2)``, per sample and channel, so
identical maps (binary or soft) give exactly 0 and disjoint ones give 1; two empty maps count as
identical (0).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def shape_consistency_loss(p: torch.Tensor, q: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean over batch and channels of ``1 - soft Dice(p, q)``. Args: (B, C, H, W) in [0, 1]."""
    p = p.float().flatten(2)
    q = q.float().flatten(2)
    inter = (p * q).sum(dim=2)
    denom = p.pow(2).sum(dim=2) + q.pow(2).sum(dim=2)
    dice = (2.0 * inter + eps) / (denom + eps)
    return (1.0 - dice).mean()

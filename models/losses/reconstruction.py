"""Reconstruction L1 normalised per sample by its own hole, so its weight does not depend on batch size.

The reference (REFERENCE.md section 5.3) divides by the hole pixels of the whole batch, so its
effective weight is ``1280 / B``. Here each sample's absolute error summed over the image is
divided by that sample's hole pixels, then averaged over the batch: identical samples give the
same loss whatever the batch size. ``--lambda_L1 200`` equals the reference at batch size 1; the
reference's default run (batch 12) corresponds to ``--lambda_L1 16.7``.
"""

from __future__ import annotations

import torch


def hole_l1(
    prediction: torch.Tensor,
    target: torch.Tensor,
    hole: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean_b [ sum_pixels(weight * |prediction - target|) / sum_pixels(hole) ].

    Args:
        prediction, target: (B, C, H, W) images.
        hole: (B, 1, H, W) {0, 1} hole of each sample (at least one pixel; clamped to 1).
        weight: optional (B, 1, H, W) per-pixel weight (HGAM down-weighting), default 1.
    Returns:
        scalar tensor (float32).
    """
    diff = (prediction.float() - target.float()).abs()
    if weight is not None:
        diff = diff * weight.float()
    per_sample = diff.flatten(1).sum(1) / hole.float().flatten(1).sum(1).clamp_min(1.0)
    return per_sample.mean()

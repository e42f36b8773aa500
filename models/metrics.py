"""Validation metrics of a synthesised region: masked PSNR and SSIM, per sample (pure, batched)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def masked_psnr(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 2.0
) -> torch.Tensor:
    """Per-sample PSNR (dB) over the pixels where ``mask`` is 1; images in [-1, 1] (range 2). Shape (B,)."""
    m = mask.float().flatten(1)
    se = (prediction.float() - target.float()).pow(2).flatten(1)
    mse = (se * m).sum(1) / m.sum(1).clamp_min(1.0)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def _gaussian(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).reshape(1, 1, size, size)


def masked_ssim(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, data_range: float = 2.0
) -> torch.Tensor:
    """Per-sample mean of the SSIM map (Gaussian window 11, sigma 1.5) over ``mask``'s pixels. Shape (B,)."""
    x, y = prediction.float(), target.float()
    k = _gaussian(device=x.device).expand(x.shape[1], 1, 11, 11)
    pad = 5

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="replicate"), k, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    m = mask.float().expand_as(ssim).flatten(1)
    return (ssim.flatten(1) * m).sum(1) / m.sum(1).clamp_min(1.0)


def hole_metrics(
    prediction: torch.Tensor, target: torch.Tensor, hole: torch.Tensor, data: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample ``ssim`` and ``psnr`` over the hole band x the ``data`` columns (B, 1, 1, W): a
    coronal slice's padding is left out, and both images carry the target's padding so SSIM windows
    at the data's edge do not see what the generator put there."""
    region = hole * data
    prediction = prediction * data + target * (1 - data)
    return {"ssim": masked_ssim(prediction, target, region), "psnr": masked_psnr(prediction, target, region)}

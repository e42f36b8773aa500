"""Correlation-coefficient losses: global (whole image) and local (windowed) Pearson correlation.

``1 - r`` per sample, averaged over the batch: 0 (the optimum) when one image is a positively scaled
and shifted copy of the other, 2 (the worst) when it is a negatively scaled copy. Variance products get a
small ``eps`` inside the square root, so constant images (zero variance) give r = 0 and a finite
gradient instead of a division by zero. The local version looks at every ``window`` x ``window``
neighbourhood (box filter, stride 1): its r is the windows' summed covariance over their summed
standard-deviation products, i.e. the mean local r weighted by local contrast, so structure must
agree everywhere while flat windows (where r is undefined) carry no weight.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

EPS = 1e-8


def correlation_coefficient(x: torch.Tensor, y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pearson r of each sample's pixels (all channels together). Args: (B, C, H, W). Returns (B,)."""
    x = x.float().flatten(1)
    y = y.float().flatten(1)
    xc = x - x.mean(dim=1, keepdim=True)
    yc = y - y.mean(dim=1, keepdim=True)
    cov = (xc * yc).mean(dim=1)
    return cov / torch.sqrt(xc.pow(2).mean(dim=1) * yc.pow(2).mean(dim=1) + eps)


def _standardise(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Zero mean and unit variance per sample (constant samples become 0)."""
    flat = x.flatten(1)
    mean = flat.mean(1).view(-1, *([1] * (x.dim() - 1)))
    var = flat.var(1, unbiased=False).view(-1, *([1] * (x.dim() - 1)))
    return (x - mean) / torch.sqrt(var + eps)


def _local_moments(x: torch.Tensor, y: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed covariance and product of variances (box filter, 'valid' positions)."""
    if window < 2 or window > min(x.shape[-2:]):
        raise ValueError(f"cc window must be in [2, {min(x.shape[-2:])}], got {window}")
    x, y = _standardise(x.float()), _standardise(y.float())  # r is scale-free; eps becomes relative

    def box(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, window, stride=1)

    mx, my = box(x), box(y)
    var_x = (box(x * x) - mx * mx).clamp_min(0.0)
    var_y = (box(y * y) - my * my).clamp_min(0.0)
    return box(x * y) - mx * my, var_x * var_y


def local_correlation_map(x: torch.Tensor, y: torch.Tensor, window: int, eps: float = EPS) -> torch.Tensor:
    """Pearson r in every ``window`` x ``window`` neighbourhood (box filter, 'valid' positions).

    Args: x, y (B, C, H, W); window at least 2 and at most min(H, W). Returns (B, C, H-w+1, W-w+1).
    """
    cov, var_prod = _local_moments(x, y, window)
    return cov / torch.sqrt(var_prod + eps)


def local_correlation(x: torch.Tensor, y: torch.Tensor, window: int, eps: float = EPS) -> torch.Tensor:
    """Contrast-weighted mean of the local r per sample: sum(cov) / sum(sqrt(var_x var_y)). Returns (B,)."""
    cov, var_prod = _local_moments(x, y, window)
    return cov.flatten(1).sum(1) / (torch.sqrt(var_prod + eps).flatten(1).sum(1) + eps)


def correlation_loss(
    x: torch.Tensor, y: torch.Tensor, window: int = 0, local_weight: float = 1.0, eps: float = EPS
) -> torch.Tensor:
    """``1 - r`` (global), plus ``local_weight * (1 - mean local r)`` when ``window`` > 0.

    Returns a scalar in [0, 2] (global only) or [0, 2 + 2 * local_weight].
    """
    loss = (1.0 - correlation_coefficient(x, y, eps)).mean()
    if window > 0:
        loss = loss + local_weight * (1.0 - local_correlation(x, y, window, eps).mean())
    return loss

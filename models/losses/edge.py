"""The Edge-Enhancing Module's loss: Sobel edge maps of the SOFT segmentation against the label's.

The reference binarised the segmentation with ``torch.where`` before the Sobel filter, which cuts
the graph (REFERENCE.md section 12, defect 1); here the filter acts on the sigmoid output, so
the loss trains the generator.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_EPS = 1e-12


def sobel_magnitude(image: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """Sobel gradient magnitude of each channel, replicate-padded, clipped at ``clip``.

    Args:
        image: (B, C, H, W).
    Returns:
        (B, C, H, W) float32, ``min(sqrt(gx^2 + gy^2), clip)``.
    """
    x = image.float()
    b, c, h, w = x.shape
    kx = _SOBEL_X.to(x.device)
    kernel = torch.stack([kx, kx.t()]).unsqueeze(1)  # (2, 1, 3, 3): gx, gy
    padded = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(padded, kernel)
    magnitude = torch.sqrt(g.pow(2).sum(1, keepdim=True) + _EPS)
    return magnitude.clamp(max=clip).reshape(b, c, h, w)


def edge_loss(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the Sobel magnitudes of the soft segmentation and of the target label."""
    return F.mse_loss(sobel_magnitude(probability), sobel_magnitude(target))

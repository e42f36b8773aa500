"""The shape extractor: a small U-Net that segments shapes (body, bone, or the given mask labels)
from a 2D image of either modality; it returns logits, one channel per shape class.

Three levels of (conv-norm-LeakyReLU) x 2 with max-pool down and bilinear up; sides must be
divisible by 4. About 0.12 M parameters at ``nf=16``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.InstanceNorm2d(cout, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


class ShapeExtractor(nn.Module):
    def __init__(self, input_nc: int = 1, n_shapes: int = 1, nf: int = 16):
        super().__init__()
        self.input_nc, self.n_shapes, self.nf = input_nc, n_shapes, nf
        self.enc1 = _double_conv(input_nc, nf)
        self.enc2 = _double_conv(nf, nf * 2)
        self.bottom = _double_conv(nf * 2, nf * 4)
        self.dec2 = _double_conv(nf * 4 + nf * 2, nf * 2)
        self.dec1 = _double_conv(nf * 2 + nf, nf)
        self.head = nn.Conv2d(nf, n_shapes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ShapeExtractor needs sides divisible by 4, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(
            torch.cat([F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False), e2], 1)
        )
        d1 = self.dec1(
            torch.cat([F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False), e1], 1)
        )
        return self.head(d1)

    def config(self) -> dict:
        return {"input_nc": self.input_nc, "n_shapes": self.n_shapes, "nf": self.nf}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE on logits plus soft Dice, for (B, n_shapes, H, W) binary targets."""
    from models.losses.shape import shape_consistency_loss

    target = target.float()
    return F.binary_cross_entropy_with_logits(logits.float(), target) + shape_consistency_loss(
        torch.sigmoid(logits.float()), target
    )

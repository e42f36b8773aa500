"""The pix2pix U-Net generator, built recursively from skip-connection blocks.

``UnetGenerator(num_downs=8)`` maps 256x256 to 256x256 (the bottleneck is 1x1); any input whose
side is divisible by 2**num_downs works. The output is tanh, in [-1, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from models.networks.norm import get_norm_layer, uses_bias


class UnetSkipConnectionBlock(nn.Module):
    """down -> submodule -> up, with the block's input concatenated to its output (except outermost)."""

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        submodule: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        norm_layer=nn.BatchNorm2d,
        use_dropout: bool = False,
    ):
        super().__init__()
        self.outermost = outermost
        bias = uses_bias(norm_layer)
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=bias)
        downrelu = nn.LeakyReLU(0.2, inplace=True)
        uprelu = nn.ReLU(inplace=True)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=bias)
            layers = [downrelu, downconv, uprelu, upconv, norm_layer(outer_nc)]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=bias)
            layers = [downrelu, downconv, norm_layer(inner_nc), submodule]
            layers += [uprelu, upconv, norm_layer(outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], dim=1)


class UnetGenerator(nn.Module):
    """U-Net with ``num_downs`` downsamplings; ``ngf`` filters in the outer layer, at most 8*ngf inside."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "batch",
        use_dropout: bool = False,
    ):
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"num_downs must be at least 5, got {num_downs}")
        self.num_downs = num_downs
        norm_layer = get_norm_layer(norm)
        block = UnetSkipConnectionBlock(ngf * 8, ngf * 8, innermost=True, norm_layer=norm_layer)
        for _ in range(num_downs - 5):
            block = UnetSkipConnectionBlock(
                ngf * 8, ngf * 8, submodule=block, norm_layer=norm_layer, use_dropout=use_dropout
            )
        block = UnetSkipConnectionBlock(ngf * 4, ngf * 8, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf * 2, ngf * 4, submodule=block, norm_layer=norm_layer)
        block = UnetSkipConnectionBlock(ngf, ngf * 2, submodule=block, norm_layer=norm_layer)
        self.model = UnetSkipConnectionBlock(
            output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True, norm_layer=norm_layer
        )

    def forward(self, x):
        side = 2**self.num_downs
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(
                f"UnetGenerator with {self.num_downs} downsamplings needs sides divisible by {side}, "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.model(x)


def unet_for_size(input_nc: int, output_nc: int, size: int, ngf: int = 64, **kwargs) -> UnetGenerator:
    """The deepest U-Net a ``size`` x ``size`` input allows (8 downsamplings at 256, 7 at 128)."""
    if size < 32 or size % 32:
        raise ValueError(f"a U-Net needs an image side divisible by 32, got {size}")
    num_downs = 5
    while size % 2 ** (num_downs + 1) == 0 and num_downs < 8:
        num_downs += 1
    return UnetGenerator(input_nc, output_nc, num_downs, ngf, **kwargs)

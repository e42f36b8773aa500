"""PatchGAN discriminators (pix2pix): an N-layer patch classifier and a 1x1 pixel classifier.

``NLayerDiscriminator(n_layers=3)`` is the 70x70 PatchGAN: for a 256x256 input it returns a
30x30 map of logits, each judging one 70x70 patch. Inputs may have any number of channels, so a
conditional discriminator sees (condition, image) concatenated.
"""

from __future__ import annotations

from torch import nn

from models.networks.norm import get_norm_layer, uses_bias


class NLayerDiscriminator(nn.Module):
    """Conv(4, stride 2) + LeakyReLU, then ``n_layers - 1`` strided conv-norm-LeakyReLU blocks, one
    stride-1 block and a 1-channel stride-1 conv (logits)."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        bias = uses_bias(norm_layer)
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                norm_layer(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """A 1x1 PatchGAN: judges every pixel on its own (colour/intensity statistics only)."""

    def __init__(self, input_nc: int, ndf: int = 64, norm: str = "batch"):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        bias = uses_bias(norm_layer)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 1, bias=bias),
            norm_layer(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 1, bias=bias),
        )

    def forward(self, x):
        return self.net(x)


def receptive_field(net: nn.Module) -> int:
    """Side in pixels of the input patch one output of ``net`` sees (its Conv2d layers in order).

    70 for the basic PatchGAN, 1 for the pixel discriminator.
    """
    rf = 1
    for conv in reversed([m for m in net.modules() if isinstance(m, nn.Conv2d)]):
        rf = (rf - 1) * conv.stride[0] + conv.dilation[0] * (conv.kernel_size[0] - 1) + 1
    return rf


def define_D(input_nc: int, ndf: int = 64, netD: str = "basic", n_layers_D: int = 3, norm: str = "batch"):
    """The discriminator ``--netD`` names: basic (70x70 PatchGAN) | n_layers | pixel (not initialised)."""
    if netD == "basic":
        return NLayerDiscriminator(input_nc, ndf, 3, norm)
    if netD == "n_layers":
        return NLayerDiscriminator(input_nc, ndf, n_layers_D, norm)
    if netD == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm)
    raise ValueError(f"unknown netD {netD!r}; use basic | n_layers | pixel")

"""The CycleGAN ResNet generator: 7x7 conv, two stride-2 downsamplings, ``n_blocks`` residual
blocks, two stride-2 upsamplings, 7x7 conv and tanh (output in [-1, 1]).

``resnet_9blocks`` suits 256x256 inputs, ``resnet_6blocks`` 128x128. Sides must be divisible by 4.
"""

from __future__ import annotations

from torch import nn

from models.networks.norm import get_norm_layer, uses_bias


class ResnetBlock(nn.Module):
    """x + conv-norm-relu-(dropout)-conv-norm(x), reflection padding."""

    def __init__(self, dim: int, norm_layer, use_dropout: bool, bias: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(dim)]
        layers.append(nn.ReLU(True))
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), norm_layer(dim)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        norm: str = "instance",
        use_dropout: bool = False,
        n_blocks: int = 9,
    ):
        super().__init__()
        norm_layer = get_norm_layer(norm)
        bias = uses_bias(norm_layer)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=bias),
            norm_layer(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                norm_layer(ngf * mult * 2),
                nn.ReLU(True),
            ]
        layers += [ResnetBlock(ngf * 4, norm_layer, use_dropout, bias) for _ in range(n_blocks)]
        for i in range(2):
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                norm_layer(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"ResnetGenerator needs sides divisible by 4, got {tuple(x.shape[-2:])}")
        return self.model(x)


def define_G(input_nc: int, output_nc: int, ngf: int, netG: str, norm: str, use_dropout: bool, size: int):
    """The generator ``--netG`` names: resnet_9blocks | resnet_6blocks | unet (depth from ``size``)."""
    if netG.startswith("resnet_") and netG.endswith("blocks"):
        n_blocks = int(netG[len("resnet_") : -len("blocks")])
        return ResnetGenerator(input_nc, output_nc, ngf, norm, use_dropout, n_blocks)
    if netG in ("unet", "unet_256", "unet_128"):
        from models.networks.unet import unet_for_size

        return unet_for_size(input_nc, output_nc, size, ngf, norm=norm, use_dropout=use_dropout)
    raise ValueError(f"unknown netG {netG!r}; use resnet_9blocks | resnet_6blocks | unet")

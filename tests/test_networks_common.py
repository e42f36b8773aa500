"""The shared pix2pix building blocks: PatchGAN, U-Net, GAN losses, image pool."""

import random

import pytest
import torch

from models.losses.gan import GANLoss, gradient_penalty
from models.networks.norm import get_norm_layer
from models.networks.patchgan import NLayerDiscriminator, define_D
from models.networks.unet import UnetGenerator, unet_for_size
from util.image_pool import ImagePool


@pytest.mark.parametrize("size,out", [(64, 6), (256, 30)])
def test_patchgan_output_map(size, out):
    d = NLayerDiscriminator(2, ndf=8)
    assert d(torch.zeros(2, 2, size, size)).shape == (2, 1, out, out)
    assert define_D(1, 8, "pixel")(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 16, 16)


def test_70x70_patchgan_has_the_reference_parameter_count():
    assert sum(p.numel() for p in define_D(1, 64, "basic").parameters()) == 2_763_585


@pytest.mark.parametrize("size,norm", [(64, "batch"), (128, "instance")])
def test_unet_shapes_and_range(size, norm):
    g = unet_for_size(3, 1, size, ngf=4, norm=norm)
    y = g(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1, size, size) and y.abs().max() <= 1
    y.mean().backward()
    assert all(p.grad is not None for p in g.parameters())
    with pytest.raises(ValueError, match="divisible"):
        UnetGenerator(1, 1, 6, 4)(torch.zeros(1, 1, 48, 48))


def test_gan_losses_known_values():
    zeros = torch.zeros(4, 1, 3, 3)
    assert GANLoss("vanilla")(zeros, True).item() == pytest.approx(0.6931472, abs=1e-6)
    assert GANLoss("lsgan")(zeros, True).item() == pytest.approx(1.0)
    assert GANLoss("lsgan")(zeros, False).item() == pytest.approx(0.0)
    ones = torch.ones(2, 1, 2, 2)
    assert GANLoss("hinge")(ones, True).item() == pytest.approx(0.0)
    assert GANLoss("hinge")(ones, False).item() == pytest.approx(2.0)
    assert GANLoss("hinge")(ones, True, for_discriminator=False).item() == pytest.approx(-1.0)
    assert GANLoss("wgangp")(ones * 3, False).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown gan_mode"):
        GANLoss("nope")


def test_gradient_penalty_of_a_unit_slope_critic_is_zero():
    class Linear(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :1]  # gradient norm exactly 1

    real, fake = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert gradient_penalty(Linear(), real, fake).item() == pytest.approx(0.0, abs=1e-6)


def test_image_pool_returns_history():
    random.seed(0)
    pool = ImagePool(2)
    first = pool.query(torch.zeros(2, 1, 2, 2))
    assert torch.equal(first, torch.zeros(2, 1, 2, 2))
    mixed = torch.cat([pool.query(torch.ones(1, 1, 2, 2)) for _ in range(20)])
    assert (mixed.flatten(1).mean(1) == 0).any() and (mixed.flatten(1).mean(1) == 1).any()
    assert torch.equal(ImagePool(0).query(torch.ones(1)), torch.ones(1))
    with pytest.raises(ValueError, match="unknown norm"):
        get_norm_layer("group")

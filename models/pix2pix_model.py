"""``--model pix2pix``: the classic U-Net + conditional PatchGAN baseline on the HealthiVert samples.

Input: the squeezed CT with its hole (``ct_masked``, ``hole``); target: the ground-truth slice
``ct``. The discriminator is conditional: it sees (input, hole, image). Losses are pix2pix's:
``G_GAN + lambda_L1 * L1`` (L1 over the whole image, default 100) and ``0.5 * (D_real + D_fake)``.
For ablations against ``--model healthivert`` on the same dataset: no heights, segmentations,
attention or composite. ``--netG unet_128`` (default; 7 downsamplings) or ``unet_256`` (8);
images are padded with -1 to a multiple of the U-Net's stride and cropped back, so any slice
size works. ``--direction`` is accepted for the reference's commands; the inputs are always
(masked CT -> CT), which is what the reference's ``BtoA`` meant.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from models.base_model import BaseModel
from models.healthivert_model import add_sample_to_device, data_columns
from models.losses.gan import GANLoss, gradient_penalty
from models.metrics import hole_metrics
from models.networks import init_net
from models.networks.patchgan import define_D
from models.networks.unet import UnetGenerator

UNETS = {"unet_128": 7, "unet_256": 8}


class Pix2PixModel(BaseModel):
    #: no image pool; the channels are fixed by the sample
    IGNORED_OPTIONS = ("pool_size", "input_nc", "output_nc")
    validation_higher_is_better = {"ssim": True, "psnr": True}

    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        parser.set_defaults(ngf=64, ndf=64, norm="batch", netG="unet_128", netD="basic")
        parser.add_argument("--lambda_L1", type=float, default=100.0, help="weight of the L1 loss (pix2pix)")
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        if opt.netG not in UNETS:
            raise ValueError(f"unknown netG {opt.netG!r} for pix2pix; use {' | '.join(UNETS)}")
        self.loss_names = ["G_GAN", "G_L1", "D_real", "D_fake"]
        self.visual_names = ["real_A", "fake_B", "real_B"]
        self.model_names = ["G", "D"] if self.isTrain else ["G"]
        self.num_downs = UNETS[opt.netG]
        self.netG = init_net(
            UnetGenerator(2, 1, self.num_downs, opt.ngf, opt.norm, use_dropout=not opt.no_dropout),
            opt.init_type,
            opt.init_gain,
            self.device,
        )
        if self.isTrain:
            self.netD = init_net(
                define_D(3, opt.ndf, opt.netD, opt.n_layers_D, opt.norm),
                opt.init_type,
                opt.init_gain,
                self.device,
            )
            self.criterionGAN = GANLoss(opt.gan_mode)
            betas = (opt.beta1, 0.999)
            self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=opt.lr, betas=betas)
            self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=opt.lr, betas=betas)
            self.optimizers = [self.optimizer_G, self.optimizer_D]
        if self.use_amp:
            for net in self.networks().values():
                net.to(memory_format=torch.channels_last)

    def set_input(self, input: dict) -> None:
        s = add_sample_to_device(input, self.device, ("ct", "ct_masked", "hole", "col_start", "col_stop"))
        self.data = data_columns(s)  # (B, 1, 1, W): the columns that hold data (coronal slices are padded)
        self.real_A = self.memory_format(s["ct_masked"].float())
        self.real_B = self.memory_format(s["ct"].float())
        self.hole = self.memory_format(s["hole"].float())
        self.image_paths = list(input.get("path", []))

    def forward(self) -> None:
        h, w = self.real_A.shape[-2:]
        side = 2**self.num_downs
        pad = (0, -w % side, 0, -h % side)
        x = torch.cat([F.pad(self.real_A, pad, value=-1.0), F.pad(self.hole, pad, value=1.0)], 1)
        with self.autocast():
            self.fake_B = self.netG(self.memory_format(x))[..., :h, :w].float()

    def _D(self, fake: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.netD(self.memory_format(torch.cat([self.real_A, self.hole, fake], 1)))

    def optimize_parameters(self) -> None:
        self.forward()
        self.set_requires_grad(self.netD, True)
        self.optimizer_D.zero_grad(set_to_none=True)
        self.loss_D_fake = self.criterionGAN(self._D(self.fake_B.detach()), False)
        self.loss_D_real = self.criterionGAN(self._D(self.real_B), True)
        loss_D = 0.5 * (self.loss_D_fake + self.loss_D_real)
        if self.opt.gan_mode == "wgangp":
            cond = torch.cat([self.real_A, self.hole], 1)
            loss_D = loss_D + gradient_penalty(
                self.netD, torch.cat([cond, self.real_B], 1), torch.cat([cond, self.fake_B.detach()], 1)
            )
        loss_D.backward()
        self.optimizer_D.step()
        self.set_requires_grad(self.netD, False)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.loss_G_GAN = self.criterionGAN(self._D(self.fake_B), True, for_discriminator=False)
        self.loss_G_L1 = self.opt.lambda_L1 * F.l1_loss(self.fake_B, self.real_B)
        (self.loss_G_GAN + self.loss_G_L1).backward()
        self.optimizer_G.step()

    def validation_metrics(self) -> dict[str, torch.Tensor]:
        """Per-sample masked-region SSIM and PSNR of the last forward pass: the hole band x the data
        columns (a coronal slice's padding is left out, with the ground truth's padding in both
        images so SSIM windows at the data's edge do not see what the generator put there)."""
        return hole_metrics(self.fake_B, self.real_B, self.hole, self.data)

"""mask2ct: CT generated from segmentation masks by a patch-based conditional GAN.

A U-Net generator maps the one-hot label subset (``--labels`` / ``--config``, see
:mod:`data.mask2ct_dataset`) to a CT slice in [-1, 1] (HU window ``--hu_min..--hu_max``); dropout in
its inner blocks (on by default, ``--no_dropout`` to switch off) is the noise that makes samples
differ. A PatchGAN discriminator judges (mask, image) pairs, so it checks that the CT fits the
mask, patch by patch. Losses: adversarial (``--gan_mode``) + ``--lambda_L1`` x L1 to the real CT.
A = mask, B = CT. On CUDA the networks run channels_last under bf16 autocast.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from data.mask2ct_dataset import parse_labels
from models.base_model import BaseModel
from models.losses.gan import GANLoss, gradient_penalty
from models.networks import init_net
from models.networks.patchgan import define_D
from models.networks.unet import unet_for_size
from util.errors import input_error


def prepare_net(
    net: nn.Module, opt: argparse.Namespace, device: torch.device, channels_last: bool
) -> nn.Module:
    """Initialise, move to ``device``, and use channels_last when asked (the model's ``use_amp``)."""
    net = init_net(net, opt.init_type, opt.init_gain, device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


class Mask2ctModel(BaseModel):
    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        parser.set_defaults(ngf=64, ndf=64, norm="batch", netG="unet", crop_size=128, gan_mode="vanilla")
        parser.set_defaults(dataset_mode="mask2ct")
        if is_train:  # test.py keeps its one sample per batch (one page entry per held-out slice)
            parser.set_defaults(batch_size=4)
            parser.add_argument("--lambda_L1", type=float, default=100.0, help="weight of the L1 loss")
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        self.subset = parse_labels(getattr(opt, "labels", None), getattr(opt, "config", None))
        # the run's options (opt.json) record the subset itself, not the path of a config file that
        # test.py and predict_volume.py would otherwise re-read (from their working directory, as it
        # is by then): the channels a network was trained on are fixed with its weights
        opt.labels, opt.config = ",".join(map(str, self.subset)), None
        n_in = len(self.subset)
        if opt.netG not in ("unet", "unet_128", "unet_256"):  # the generator is always a U-Net
            raise input_error(
                None, f"--model mask2ct has a U-Net generator (depth from --crop_size); got --netG {opt.netG}"
            )
        self.loss_names = ["G_GAN", "G_L1", "D_real", "D_fake"]
        self.visual_names = ["real_A_map", "fake_B", "real_B"]
        self.model_names = ["G", "D"] if self.isTrain else ["G"]
        self.netG = prepare_net(
            unet_for_size(n_in, 1, opt.crop_size, opt.ngf, norm=opt.norm, use_dropout=not opt.no_dropout),
            opt,
            self.device,
            self.use_amp,
        )
        if self.isTrain:
            self.netD = prepare_net(
                define_D(n_in + 1, opt.ndf, opt.netD, opt.n_layers_D, opt.norm),
                opt,
                self.device,
                self.use_amp,
            )
            self.criterionGAN = GANLoss(opt.gan_mode).to(self.device)
            betas = (opt.beta1, 0.999)
            self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=opt.lr, betas=betas)
            self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=opt.lr, betas=betas)
            self.optimizers = [self.optimizer_G, self.optimizer_D]

    def set_input(self, input: dict) -> None:
        self.real_A = input["A"].to(self.device)
        self.real_B = input["B"].to(self.device) if "B" in input else None
        self.image_paths = list(input.get("A_paths", []))

    def forward(self) -> None:
        with self.autocast():
            self.fake_B = self.netG(self.real_A).float()

    def compute_visuals(self) -> None:
        # one grey-level image of the labels: channel index scaled to [-1, 1]
        weights = torch.linspace(-1, 1, self.real_A.shape[1], device=self.real_A.device).view(1, -1, 1, 1)
        self.real_A_map = (
            (self.real_A * weights).sum(1, keepdim=True) if self.real_A.shape[1] > 1 else self.real_A
        )

    def backward_D(self) -> None:
        with self.autocast():
            fake_AB = torch.cat([self.real_A, self.fake_B.detach()], 1)
            real_AB = torch.cat([self.real_A, self.real_B], 1)
            self.loss_D_fake = self.criterionGAN(self.netD(fake_AB), False)
            self.loss_D_real = self.criterionGAN(self.netD(real_AB), True)
        loss = (self.loss_D_fake + self.loss_D_real) * 0.5
        if self.opt.gan_mode == "wgangp":
            loss = loss + gradient_penalty(self.netD, real_AB, fake_AB)
        loss.backward()

    def backward_G(self) -> None:
        with self.autocast():
            pred = self.netD(torch.cat([self.real_A, self.fake_B], 1))
            self.loss_G_GAN = self.criterionGAN(pred, True, for_discriminator=False)
        self.loss_G_L1 = nn.functional.l1_loss(self.fake_B, self.real_B) * self.opt.lambda_L1
        (self.loss_G_GAN + self.loss_G_L1).backward()

    def optimize_parameters(self) -> None:
        self.forward()
        self.set_requires_grad(self.netD, True)
        self.optimizer_D.zero_grad(set_to_none=True)
        self.backward_D()
        self.optimizer_D.step()
        self.set_requires_grad(self.netD, False)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.backward_G()
        self.optimizer_G.step()

"""cycle_gan: unpaired MR-to-CT translation (CycleGAN) with a correlation-coefficient loss and a
shape discriminator.

Generators G_A (A -> B, MR -> CT) and G_B (B -> A); discriminators D_A (judges B-domain images)
and D_B (A-domain); losses: adversarial (``--gan_mode``, lsgan by default) with image pools
(``--pool_size``), cycle (``--lambda_A``, ``--lambda_B``) and identity (``--lambda_identity`` times
the cycle weight).

``--lambda_cc``: ``lambda_cc * [(1 - r(real_A, fake_B)) + (1 - r(real_B, fake_A))]`` with r the
global Pearson correlation, plus the mean local r over ``--cc_window`` x ``--cc_window`` windows
when ``--cc_window`` > 0 (:mod:`models.losses.correlation`): the translation keeps the input's
structure.

``--shape_discriminator``: a shape extractor S (:mod:`models.networks.shape_extractor`) segments
shapes (body, or mask foreground) in images of both domains. The shape-consistency loss
(``--lambda_shape``, soft Dice, :mod:`models.losses.shape`) asks S(fake_B) to match S(real_A) and
S(fake_A) to match S(real_B); a discriminator D_S judges shapes of real images against shapes of
translated ones (``--lambda_shape_gan``). S is never updated by the generators' losses. With
``--shape_extractor PATH`` (a checkpoint of ``train_shape_extractor.py``) S is loaded and frozen;
without it S is trained jointly, from scratch, on the real images of both domains and their shape
targets (masks or thresholded body masks from the dataset), one step per iteration (loss
``S_seg``), and saved with the other networks.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from models.base_model import BaseModel
from models.losses.correlation import correlation_loss
from models.losses.gan import GANLoss, gradient_penalty
from models.losses.shape import shape_consistency_loss
from models.mask2ct_model import prepare_net
from models.networks.patchgan import define_D
from models.networks.resnet import define_G
from models.networks.shape_extractor import ShapeExtractor, segmentation_loss
from util.checkpoint import load_checkpoint, state_mismatch
from util.errors import input_error
from util.image_pool import ImagePool

log = logging.getLogger(__name__)


def slice_differences(trained_on: dict | None, opt: argparse.Namespace) -> list[str]:
    """How the slices a shape extractor was trained on (its checkpoint's ``trained_on``) differ
    from this run's: ``--spacing_mm 1.0 there, 2.0 here`` and the like; empty when they agree or
    the checkpoint does not say (saved before it recorded them)."""
    out = []
    for key in ("spacing_mm", "slice_axis"):  # what sets a shape's scale and orientation (not the crop)
        value = (trained_on or {}).get(key)
        here = getattr(opt, key, None)
        if here is not None and value is not None and float(here) != float(value):
            out.append(f"--{key} {value:g} there, {here:g} here")
    return out


def load_shape_extractor(path: str, device: torch.device) -> ShapeExtractor:
    """A shape extractor saved by ``train_shape_extractor.py`` ({'config': ..., 'state_dict': ...,
    'trained_on': the slices it learnt from}); that record is kept as ``net.trained_on``."""
    saved = load_checkpoint(path, map_location=device)
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        raise input_error(path, "not a shape-extractor checkpoint (expected config and state_dict)")
    try:
        net = ShapeExtractor(**saved["config"])
    except (TypeError, ValueError) as exc:
        raise input_error(path, f"its config does not build a shape extractor ({exc})") from exc
    problem = state_mismatch(net.state_dict(), saved["state_dict"])
    if problem:
        raise input_error(path, f"its weights do not fit its config: {problem}")
    net.load_state_dict(saved["state_dict"])
    net.trained_on = saved.get("trained_on")
    return net.to(device)


class CycleGanModel(BaseModel):
    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        parser.set_defaults(
            ngf=64,
            ndf=64,
            norm="instance",
            netG="resnet_9blocks",
            no_dropout=True,
            crop_size=128,
            dataset_mode="unaligned",
            batch_size=1,
            direction="AtoB",
        )
        if is_train:
            parser.set_defaults(gan_mode="lsgan", pool_size=50)
            g = parser.add_argument_group("cycle_gan losses")
            g.add_argument("--lambda_A", type=float, default=10.0, help="cycle loss A -> B -> A")
            g.add_argument("--lambda_B", type=float, default=10.0, help="cycle loss B -> A -> B")
            g.add_argument(
                "--lambda_identity", type=float, default=0.5, help="identity loss, times lambda_A/B"
            )
            g.add_argument("--lambda_cc", type=float, default=0.0, help="correlation-coefficient loss weight")
            g.add_argument(
                "--cc_window", type=int, default=0, help="local correlation window (px); 0 = global only"
            )
            g.add_argument(
                "--shape_discriminator", action="store_true", help="shape extractor + shape losses"
            )
            g.add_argument(
                "--shape_extractor", default=None, help="trained shape extractor (else trained jointly)"
            )
            g.add_argument("--lambda_shape", type=float, default=1.0, help="shape-consistency loss weight")
            g.add_argument(
                "--lambda_shape_gan", type=float, default=1.0, help="shape discriminator loss weight"
            )
            g.add_argument("--shape_nf", type=int, default=16, help="filters of a jointly trained extractor")
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        self.loss_names = ["D_A", "G_A", "cycle_A", "idt_A", "D_B", "G_B", "cycle_B", "idt_B"]
        self.visual_names = ["real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B"]
        self.model_names = ["G_A", "G_B"]
        use_dropout = not opt.no_dropout
        self.netG_A = prepare_net(
            define_G(opt.input_nc, opt.output_nc, opt.ngf, opt.netG, opt.norm, use_dropout, opt.crop_size),
            opt,
            self.device,
            self.use_amp,
        )
        self.netG_B = prepare_net(
            define_G(opt.output_nc, opt.input_nc, opt.ngf, opt.netG, opt.norm, use_dropout, opt.crop_size),
            opt,
            self.device,
            self.use_amp,
        )
        self.shape = bool(getattr(opt, "shape_discriminator", False)) and self.isTrain
        self.train_S = False
        if not self.isTrain:
            return
        if opt.lambda_identity > 0 and opt.input_nc != opt.output_nc:
            raise input_error(None, "--lambda_identity needs input_nc == output_nc")
        # what would otherwise fail at the first iteration, with a traceback, after the run folder
        # (opt.json, loss_log.txt) is written: training crops are --crop_size square
        if opt.crop_size % 4:
            raise input_error(
                None, f"--crop_size must be divisible by 4 (generator strides), got {opt.crop_size}"
            )
        if opt.lambda_cc > 0 and opt.cc_window != 0 and not 2 <= opt.cc_window <= opt.crop_size:
            raise input_error(
                None,
                f"--cc_window must be 0 (global only) or in [2, --crop_size {opt.crop_size}], "
                f"got {opt.cc_window}",
            )
        self.model_names += ["D_A", "D_B"]
        self.netD_A = prepare_net(
            define_D(opt.output_nc, opt.ndf, opt.netD, opt.n_layers_D, opt.norm),
            opt,
            self.device,
            self.use_amp,
        )
        self.netD_B = prepare_net(
            define_D(opt.input_nc, opt.ndf, opt.netD, opt.n_layers_D, opt.norm),
            opt,
            self.device,
            self.use_amp,
        )
        self.fake_A_pool, self.fake_B_pool = ImagePool(opt.pool_size), ImagePool(opt.pool_size)
        self.criterionGAN = GANLoss(opt.gan_mode).to(self.device)
        betas = (opt.beta1, 0.999)
        g_params = list(self.netG_A.parameters()) + list(self.netG_B.parameters())
        d_params = list(self.netD_A.parameters()) + list(self.netD_B.parameters())
        if opt.lambda_cc > 0:
            self.loss_names += ["cc_A", "cc_B"]
        if self.shape:
            self.loss_names += ["shape", "G_S", "D_S"]
            self.model_names += ["S", "D_S"]
            if opt.shape_extractor:
                self.netS = load_shape_extractor(opt.shape_extractor, self.device)
                differ = slice_differences(self.netS.trained_on, opt)
                if differ:
                    log.warning(
                        "%s was trained on other slices than this run's (%s): its shapes are of another "
                        "scale or orientation",
                        opt.shape_extractor,
                        "; ".join(differ),
                    )
                channels = {opt.input_nc, opt.output_nc}  # S sees the images of both domains
                if channels != {self.netS.input_nc}:
                    raise input_error(
                        opt.shape_extractor,
                        f"the shape extractor takes {self.netS.input_nc}-channel images, but the "
                        f"images have {' and '.join(map(str, sorted(channels)))} channels "
                        "(--input_nc/--output_nc)",
                    )
            else:
                self.train_S = True
                self.loss_names.append("S_seg")
                self.netS = prepare_net(
                    ShapeExtractor(opt.input_nc, 1, opt.shape_nf), opt, self.device, self.use_amp
                )
            self.netD_S = prepare_net(
                define_D(self.netS.n_shapes, opt.ndf, opt.netD, opt.n_layers_D, opt.norm),
                opt,
                self.device,
                self.use_amp,
            )
            d_params += list(self.netD_S.parameters())
            if not self.train_S:
                # a loaded extractor stays frozen; a jointly trained one keeps trainable parameters
                # here, so setup() wraps it for torchrun (backward_S unfreezes it for its own step
                # only, and optimize_parameters freezes it for the generators' step)
                self.set_requires_grad(self.netS, False)
        self.optimizer_G = torch.optim.Adam(g_params, lr=opt.lr, betas=betas)
        self.optimizer_D = torch.optim.Adam(d_params, lr=opt.lr, betas=betas)
        self.optimizers = [self.optimizer_G, self.optimizer_D]
        if self.train_S:
            self.optimizer_S = torch.optim.Adam(self.netS.parameters(), lr=opt.lr, betas=betas)
            self.optimizers.append(self.optimizer_S)

    # --- the image pools are training state ----------------------------------------------------
    def extra_train_state(self) -> dict:
        if not self.isTrain:
            return {}
        return {"fake_A_pool": self.fake_A_pool.state_dict(), "fake_B_pool": self.fake_B_pool.state_dict()}

    def load_extra_train_state(self, state: dict | None) -> None:
        if not self.isTrain or self.opt.pool_size <= 0:
            return
        if not state or "fake_A_pool" not in state:
            log.warning("the train state holds no image pools: they start empty (the resume is not exact)")
            return
        self.fake_A_pool.load_state_dict(state["fake_A_pool"], self.device)
        self.fake_B_pool.load_state_dict(state["fake_B_pool"], self.device)

    def set_input(self, input: dict) -> None:
        a_to_b = self.opt.direction == "AtoB"
        get = lambda key: input[key].to(self.device) if key in input else None  # noqa: E731
        self.real_A = get("A" if a_to_b else "B")
        self.real_B = get("B" if a_to_b else "A")
        self.shape_A = get("shape_A" if a_to_b else "shape_B")
        self.shape_B = get("shape_B" if a_to_b else "shape_A")
        self.image_paths = list(input.get("A_paths" if a_to_b else "B_paths", []))

    def forward(self) -> None:
        with self.autocast():
            self.fake_B = self.netG_A(self.real_A).float()
            self.rec_A = self.netG_B(self.fake_B).float()
            if self.real_B is not None:
                self.fake_A = self.netG_B(self.real_B).float()
                self.rec_B = self.netG_A(self.fake_A).float()

    def _shapes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.netS(x).float())

    def backward_S(self) -> None:
        """One supervised step of a jointly trained shape extractor, on real images only."""
        self.set_requires_grad(self.netS, True)
        self.optimizer_S.zero_grad(set_to_none=True)
        with self.autocast():
            images = torch.cat([self.real_A, self.real_B])
            self.loss_S_seg = segmentation_loss(self.netS(images), torch.cat([self.shape_A, self.shape_B]))
        self.loss_S_seg.backward()
        self.optimizer_S.step()
        self.set_requires_grad(self.netS, False)

    def generator_loss_names(self) -> list[str]:
        """The terms :meth:`backward_G` sums: adversarial, cycle, identity, correlation and shape
        losses (not the discriminators', nor the jointly trained extractor's ``S_seg``)."""
        return [name for name in self.loss_names if not name.startswith("D_") and name != "S_seg"]

    def backward_G(self) -> None:
        opt = self.opt
        with self.autocast():
            if opt.lambda_identity > 0:
                self.idt_A = self.netG_A(self.real_B).float()
                self.idt_B = self.netG_B(self.real_A).float()
                self.loss_idt_A = (
                    nn.functional.l1_loss(self.idt_A, self.real_B) * opt.lambda_B * opt.lambda_identity
                )
                self.loss_idt_B = (
                    nn.functional.l1_loss(self.idt_B, self.real_A) * opt.lambda_A * opt.lambda_identity
                )
            else:
                self.loss_idt_A = self.loss_idt_B = torch.zeros((), device=self.device)
            self.loss_G_A = self.criterionGAN(self.netD_A(self.fake_B), True, for_discriminator=False)
            self.loss_G_B = self.criterionGAN(self.netD_B(self.fake_A), True, for_discriminator=False)
            self.loss_cycle_A = nn.functional.l1_loss(self.rec_A, self.real_A) * opt.lambda_A
            self.loss_cycle_B = nn.functional.l1_loss(self.rec_B, self.real_B) * opt.lambda_B
            total = self.loss_G_A + self.loss_G_B + self.loss_cycle_A + self.loss_cycle_B
            total = total + self.loss_idt_A + self.loss_idt_B
            if opt.lambda_cc > 0:
                self.loss_cc_A = correlation_loss(self.real_A, self.fake_B, opt.cc_window) * opt.lambda_cc
                self.loss_cc_B = correlation_loss(self.real_B, self.fake_A, opt.cc_window) * opt.lambda_cc
                total = total + self.loss_cc_A + self.loss_cc_B
            if self.shape:
                with torch.no_grad():
                    real_shapes = self._shapes(torch.cat([self.real_A, self.real_B]))
                fake_shapes = self._shapes(torch.cat([self.fake_B, self.fake_A]))
                self.loss_shape = shape_consistency_loss(fake_shapes, real_shapes) * opt.lambda_shape
                self.loss_G_S = (
                    self.criterionGAN(self.netD_S(fake_shapes), True, for_discriminator=False)
                    * opt.lambda_shape_gan
                )
                self.fake_shapes = fake_shapes.detach()
                self.real_shapes = real_shapes
                total = total + self.loss_shape + self.loss_G_S
        total.backward()

    def _backward_D(
        self, netD: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """``weight`` x the discriminator loss (plus the WGAN-GP penalty), backpropagated; returned."""
        with self.autocast():
            loss = (self.criterionGAN(netD(real), True) + self.criterionGAN(netD(fake.detach()), False)) * 0.5
        if self.opt.gan_mode == "wgangp":
            loss = loss + gradient_penalty(netD, real, fake)
        loss = loss * weight
        loss.backward()
        return loss

    def optimize_parameters(self) -> None:
        self.forward()
        if self.train_S:
            self.backward_S()
        discriminators = [self.netD_A, self.netD_B] + ([self.netD_S] if self.shape else [])
        self.set_requires_grad(discriminators, False)
        self.optimizer_G.zero_grad(set_to_none=True)
        self.backward_G()
        self.optimizer_G.step()
        self.set_requires_grad(discriminators, True)
        self.optimizer_D.zero_grad(set_to_none=True)
        self.loss_D_A = self._backward_D(self.netD_A, self.real_B, self.fake_B_pool.query(self.fake_B))
        self.loss_D_B = self._backward_D(self.netD_B, self.real_A, self.fake_A_pool.query(self.fake_A))
        if self.shape:
            self.loss_D_S = self._backward_D(
                self.netD_S, self.real_shapes, self.fake_shapes, self.opt.lambda_shape_gan
            )
        self.optimizer_D.step()

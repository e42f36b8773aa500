"""``--model healthivert``: the two-stage HealthiVert-GAN with EEM, SHRM and HGAM (REFERENCE.md 4-6).

One training step (REFERENCE.md Appendix A, with the section 12 defects fixed):

* G (:class:`models.networks.inpaint.InpaintGenerator`): the coarse stage sees the squeezed CT,
  the slice-ratio map and the hole, with ``1 - CAM`` guidance in its decoder (HGAM); the fine
  stage refines the hole filled by the coarse image (``--fine_input composite``; ``masked`` is the
  reference code's input) with hallucination and per-sample contextual attention. Each stage
  predicts the height as a fraction of the sample's hole (SHRM); ``fraction * hole_rows`` rounded up as in the
  reference (``--height_rounding round``: to the nearest row) generated rows are inserted
  between the real neighbours (:func:`models.composite.compose`), without the reference's floor
  at the observed height (defect 6).
* Three PatchGANs in ``netD`` (an ``nn.ModuleDict``, saved as ``<epoch>_net_D.pth``): ``global``
  (fine composite vs ground truth), ``local`` (hole band x central ``--local_width`` of the
  columns) and ``seg`` (fine segmentation, binarised by a straight-through estimator so its
  generator term trains G, vs the target label). By default (``--d_window band``) ``local`` and
  ``seg`` see a window centred on each sample's hole band instead of the reference's zero-padded
  full images (see :meth:`HealthiVertModel._discriminator_inputs`); ``--d_window full`` is the
  reference's input. On the CPU the generator's activations are recomputed in the backward pass
  (``--grad_checkpoint``, exact gradients) to keep the peak memory down.
* Generator losses, returned by :meth:`generator_losses` as a dict and summed in one place:
  ``G_GAN`` (``--lambda_GAN`` per discriminator, 1/6 as in the reference; 0 leaves the
  discriminators out of the step, an ablation with about three times the iterations per CPU
  minute), ``G_L1`` (both stages, normalised per sample by its own hole: independent of batch
  size, defect 2; with ``--hgam_loss_weight w`` each pixel weighted ``1 - w * cam_target``, the
  CAM in the frame of the ground truth and the composite),
  ``G_Dice`` (fine, 15) and ``coarse_Dice`` (healthy neighbours, 10), ``edge`` (EEM: Sobel on the
  soft fine segmentation, 800; defect 1) and ``height`` (40 + 40, relative).

:meth:`HealthiVertModel.synthesise` is the inference entry point of the iterative 3D synthesis.
On CUDA the forward passes run under bf16 autocast with channels_last tensors (``--no_amp``
turns both off); on the CPU everything is fp32.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from models.base_model import BaseModel
from models.composite import compose, compose_top
from models.losses.dice import dice_loss, soft_dice
from models.losses.edge import edge_loss, sobel_magnitude
from models.losses.gan import GANLoss, gradient_penalty
from models.losses.height import ROUNDINGS, height_loss, predicted_rows
from models.losses.reconstruction import hole_l1
from models.metrics import hole_metrics
from models.networks import init_net
from models.networks.inpaint import FINE_INPUTS, InpaintGenerator
from models.networks.patchgan import define_D, receptive_field

SAMPLE_TENSORS = (
    "ct",
    "ct_masked",
    "hole",
    "target_mask",
    "neighbour_mask",
    "cam",
    "cam_target",
    "slice_ratio",
    "height",
    "x1",
    "x2",
    "band_top",
    "band_bottom",
    "hole_rows",
    "row_spacing_mm",
    "col_start",
    "col_stop",
)
D_NAMES = ("global", "local", "seg")
# --grad_checkpoint auto on the CPU: recompute G's activations only for batches of at least this many
# pixels (half the reference's 12 x 256 x 256), where they cost gigabytes; small batches keep the time.
AUTO_CHECKPOINT_PIXELS = 6 * 256 * 256


def straight_through_binary(probability: torch.Tensor) -> torch.Tensor:
    """``probability > 0.5`` as 0/1 in the forward pass, with the identity gradient backwards."""
    hard = (probability > 0.5).to(probability.dtype)
    return hard + probability - probability.detach()


def central_columns(width: int, fraction: float, device: torch.device) -> torch.Tensor:
    """(1, 1, 1, W) mask of the central ``fraction`` of the columns (at least one column)."""
    first, stop = column_span(width, fraction)
    c = torch.arange(width, device=device)
    return ((c >= first) & (c < stop)).float().reshape(1, 1, 1, width)


def column_span(width: int, fraction: float, min_cols: int = 0) -> tuple[int, int]:
    """First and last+1 of the central ``fraction`` of ``width`` columns (at least two, and at
    least ``min_cols`` up to ``width``)."""
    half = max(1, round(width * fraction / 2), -(-min_cols // 2))
    return max(0, width // 2 - half), min(width, width // 2 + half)


def band_window(
    band_top: torch.Tensor, band_bottom: torch.Tensor, image_rows: int, min_rows: int, multiple: int = 8
) -> tuple[torch.Tensor, int]:
    """Rows of a window shared by the batch that holds every sample's hole band, centred on it.

    Args:
        band_top, band_bottom: per-sample hole rows ``[band_top, band_bottom)``, shape (B,) or (B, 1).
        image_rows: rows of the image.
        min_rows: the window has at least this many rows (a discriminator's receptive field).
        multiple: the window's rows are rounded up to a multiple of this.
    Returns:
        ``(start, rows)``: per-sample first row (B,) int64 and the common window height; the
        window lies inside the image and contains ``[band_top, band_bottom)``.
    """
    top, bottom = band_top.reshape(-1).long(), band_bottom.reshape(-1).long()
    rows = max(int((bottom - top).max()), min_rows)
    rows = min(image_rows, -(-rows // multiple) * multiple)
    # centred, it holds the band (rows >= its height); the clamp keeps it inside the image
    start = torch.div(top + bottom, 2, rounding_mode="floor") - rows // 2
    return start.clamp(0, image_rows - rows), rows


def crop_rows(x: torch.Tensor, start: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows ``[start_b, start_b + rows)`` of each sample of ``x`` (B, C, H, W); differentiable."""
    b, c, _, w = x.shape
    index = (start.reshape(b, 1) + torch.arange(rows, device=x.device)).reshape(b, 1, rows, 1)
    return torch.gather(x, 2, index.expand(b, c, rows, w))


def data_columns(sample: dict) -> torch.Tensor:
    """(B, 1, 1, W) mask of each sample's columns ``[col_start, col_stop)`` that hold data (a coronal
    slice is padded to the sagittal width); all columns when the batch does not say."""
    ct = sample["ct"]
    cols = torch.arange(ct.shape[-1], device=ct.device).reshape(1, 1, 1, -1)
    if "col_start" not in sample or "col_stop" not in sample:
        return torch.ones_like(cols, dtype=ct.dtype)
    start = sample["col_start"].reshape(-1, 1, 1, 1)
    stop = sample["col_stop"].reshape(-1, 1, 1, 1)
    return ((cols >= start) & (cols < stop)).to(ct.dtype)


def add_sample_to_device(batch: dict, device: torch.device, keys=SAMPLE_TENSORS) -> dict:
    """The tensors of a batch in the sample contract on ``device`` (float for images, int64 kept)."""
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def generator_shift(sample: dict) -> torch.Tensor:
    """(B,) rows from the composite's frame to the generator's: ``band_top`` minus the hole's
    unclipped top ``(x1 + x2) // 2 - hole_rows // 2``. Zero unless the dataset shifted the hole to
    keep it inside the image (a target within half a hole of the top or bottom row)."""
    hole = sample["hole_rows"].reshape(-1).long()
    top = compose_top(sample["x1"].reshape(-1), sample["x2"].reshape(-1), hole)
    if "band_top" not in sample:
        return torch.zeros_like(top)
    return sample["band_top"].reshape(-1).long() - top


def shift_rows(x: torch.Tensor, shift: torch.Tensor, fill: float) -> torch.Tensor:
    """Row ``r`` of sample ``b`` <- row ``r + shift_b`` of ``x`` (B, C, H, W); ``fill`` where that
    row is outside the image. Differentiable with respect to ``x``."""
    b, c, h, w = x.shape
    src = torch.arange(h, device=x.device).reshape(1, h) + shift.to(x.device).reshape(b, 1)
    valid = ((src >= 0) & (src < h)).reshape(b, 1, h, 1)
    out = torch.gather(x, 2, src.clamp(0, h - 1).reshape(b, 1, h, 1).expand(b, c, h, w))
    return torch.where(valid, out, torch.full_like(out, fill))


def composite_rows(sample: dict) -> tuple[int, int]:
    """The rows of the generated image any composite of the batch can take, whatever height is
    predicted: the band of ``rows`` in [0, hole_rows] ends at ``c + ceil(rows / 2)`` (``c`` the
    target's middle row), so the full hole's band holds every smaller one; in the generator's
    frame (:func:`generator_shift`) that band is the hole itself."""
    hole = sample["hole_rows"].reshape(-1).long()
    top = compose_top(sample["x1"].reshape(-1), sample["x2"].reshape(-1), hole) + generator_shift(sample)
    return int(top.min()), int((top + hole).max())


class HealthiVertModel(BaseModel):
    #: no image pool; the channels are fixed by the sample; the generator is the paper's
    IGNORED_OPTIONS = ("pool_size", "input_nc", "output_nc", "netG", "no_dropout")
    validation_higher_is_better = {
        "ssim": True,
        "psnr": True,
        "dice": True,
        "coarse_dice": True,
        "height_error_mm": False,
    }

    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        parser.set_defaults(ngf=16, ndf=64, norm="batch", netD="basic")
        g = parser.add_argument_group("healthivert")
        g.add_argument(
            "--lambda_L1", type=float, default=200.0, help="reconstruction L1 (per-sample hole mean)"
        )
        g.add_argument(
            "--lambda_GAN", type=float, default=1 / 6, help="weight of each discriminator's G term"
        )
        g.add_argument("--lambda_dice_fine", type=float, default=15.0, help="Dice of the fine (target) seg")
        g.add_argument(
            "--lambda_dice_coarse", type=float, default=10.0, help="Dice of the coarse (neighbour) seg"
        )
        g.add_argument("--lambda_edge", type=float, default=800.0, help="EEM Sobel edge loss on the soft seg")
        g.add_argument(
            "--lambda_height_coarse", type=float, default=40.0, help="relative height loss, coarse head"
        )
        g.add_argument(
            "--lambda_height_fine", type=float, default=40.0, help="relative height loss, fine head"
        )
        g.add_argument(
            "--hgam_loss_weight",
            type=float,
            default=0.0,
            help="HGAM: L1 weight becomes 1 - w * CAM (0 = off, the reference)",
        )
        g.add_argument(
            "--height_rounding",
            choices=ROUNDINGS,
            default="ceil",
            help="predicted height fraction x hole rows -> inserted rows: up as in the reference "
            "(per slice about half a row taller on average), or the nearest row",
        )
        g.add_argument(
            "--fine_input",
            choices=FINE_INPUTS,
            default="composite",
            help="the fine stage's image input: the masked CT with the hole filled by the coarse image "
            "(DeepFill's coarse-to-fine), or 'masked': the masked CT as in the reference's code",
        )
        g.add_argument(
            "--fine_skips",
            action="store_true",
            help="the fine decoder also reads the hallucination branch's half- and full-resolution "
            "features (U-Net skips; not in the paper or the reference, 11,520 more parameters at ngf 16)",
        )
        g.add_argument(
            "--local_width", type=float, default=70 / 256, help="local D: central fraction of the columns"
        )
        g.add_argument(
            "--d_window",
            choices=("band", "full"),
            default="band",
            help="local and seg D inputs: 'band' = a window around the hole band (rows: the band, at "
            "least one D receptive field; local columns: the central band), 'full' = the whole "
            "zero-padded image as in the reference (same losses, about 2x slower training)",
        )
        g.add_argument(
            "--grad_checkpoint",
            choices=("auto", "on", "off"),
            default="auto",
            help="recompute G's activations in the backward pass (less memory, about one more G "
            "forward per step); auto = on the CPU for batches of at least 6 x 256 x 256 pixels, "
            "off on CUDA",
        )
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        self.loss_names = [
            "D_global",
            "D_local",
            "D_seg",
            "G_GAN",
            "G_L1",
            "G_Dice",
            "coarse_Dice",
            "edge",
            "height",
        ]
        self.visual_names = [
            "real_A",
            "fake_coarse",
            "fake_B",
            "real_B",
            "cam",
            "seg_coarse",
            "seg_fine",
            "target_mask",
            "edge_fake",
            "edge_real",
        ]
        self.model_names = ["G", "D"] if self.isTrain else ["G"]
        hgam = float(getattr(opt, "hgam_loss_weight", 0.0))
        if not 0.0 <= hgam <= 1.0:
            # 1 - w x CAM must stay in [0, 1]: above 1 the L1 turns negative where the CAM is high and
            # training would reward reconstruction errors there
            raise ValueError(f"--hgam_loss_weight must be in [0, 1], got {hgam:g}")
        # G keeps PyTorch's default initialisation, as in the reference (spectral norm on every conv)
        # a run saved before --fine_input existed was trained with the masked CT
        fine_input = getattr(opt, "fine_input", "masked")
        fine_skips = getattr(opt, "fine_skips", False)
        self.netG = InpaintGenerator(opt.ngf, fine_input=fine_input, fine_skips=fine_skips).to(self.device)
        self.checkpoint_mode = getattr(opt, "grad_checkpoint", "off") if self.isTrain else "off"
        self.netG.checkpointing = self.checkpoint_mode == "on"
        if self.isTrain:
            self.netD = init_net(
                nn.ModuleDict({k: define_D(1, opt.ndf, opt.netD, opt.n_layers_D, opt.norm) for k in D_NAMES}),
                opt.init_type,
                opt.init_gain,
                self.device,
            )
            self.criterionGAN = GANLoss(opt.gan_mode)
            betas = (opt.beta1, 0.999)
            self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=opt.lr, betas=betas)
            # one Adam over the three Ds equals three Adams (Adam's state is per parameter)
            self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=opt.lr, betas=betas)
            self.optimizers = [self.optimizer_G, self.optimizer_D]
        if self.use_amp:
            for net in self.networks().values():
                net.to(memory_format=torch.channels_last)

    # --- data -------------------------------------------------------------------------------
    def set_input(self, input: dict) -> None:
        s = add_sample_to_device(input, self.device)
        for name in ("ct", "ct_masked", "hole", "target_mask", "neighbour_mask", "cam", "cam_target"):
            if name in s:  # cam_target: only the loss needs it (synthesis batches may leave it out)
                s[name] = self.memory_format(s[name].float())
        self.sample = s
        # rows from the composite's frame to the generator's, found on the batch as loaded (no
        # device sync in the training step); None when no hole was shifted, the usual case
        shift = generator_shift(input)
        self.shift = shift.to(self.device) if bool(shift.any()) else None
        if self.checkpoint_mode == "auto":
            big = s["ct"].numel() >= AUTO_CHECKPOINT_PIXELS
            self.netG.checkpointing = self.device.type == "cpu" and big
        self.real_A, self.real_B, self.cam = s["ct_masked"], s["ct"], s["cam"]
        self.target_mask = s["target_mask"]
        self.image_paths = list(input.get("path", []))
        h, w = s["ct"].shape[-2:]
        self.local_mask = s["hole"] * central_columns(w, self.opt.local_width, self.device)
        self.window = None
        if getattr(self.opt, "d_window", "full") == "band" and self.isTrain:
            field = receptive_field(self.netD["local"])
            start, rows = band_window(s["band_top"], s["band_bottom"], h, min(h, field))
            self.window = (start, rows, *column_span(w, self.opt.local_width, field))

    # --- forward ----------------------------------------------------------------------------
    def forward(self, rows: tuple[int, int] | None = None) -> None:
        """G on the current sample; ``rows``: only those rows of the fine outputs are computed
        (:class:`InpaintGenerator`; the composite must take no other row)."""
        s = self.sample
        with self.autocast():
            out = self.netG(s["ct_masked"], s["hole"], s["slice_ratio"], s["cam"], rows=rows)
        # the composite centres the band on the target's middle row; where the dataset shifted the
        # hole to keep it inside the image, the generator drew it centred in the shifted hole: move
        # its outputs by that shift so the same input always gives the same inserted rows
        if self.shift is not None:
            out = out._replace(
                coarse_image=shift_rows(out.coarse_image, self.shift, -1.0),
                fine_image=shift_rows(out.fine_image, self.shift, -1.0),
                fine_seg=shift_rows(out.fine_seg, self.shift, 0.0),
            )
        self.out = out
        rounding = getattr(self.opt, "height_rounding", "ceil")
        self.rows_coarse = predicted_rows(out.coarse_height, s["hole_rows"], rounding)
        self.rows_fine = predicted_rows(out.fine_height, s["hole_rows"], rounding)
        self.fake_coarse = compose(
            out.coarse_image.float(), s["ct"], s["x1"], s["x2"], self.rows_coarse, -1.0
        )
        self.fake_B = compose(out.fine_image.float(), s["ct"], s["x1"], s["x2"], self.rows_fine, -1.0)
        self.seg_coarse = out.coarse_seg.float()
        self.seg_fine = out.fine_seg.float()

    def compute_visuals(self) -> None:
        self.edge_fake = sobel_magnitude(self.seg_fine.detach())
        self.edge_real = sobel_magnitude(self.target_mask)

    def _discriminator_inputs(self, detach: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{name: (fake, real)} for the three discriminators.

        ``global`` sees the whole composite. ``local`` sees the hole band x central columns, zero
        elsewhere, and ``seg`` the binarised fine segmentation vs the target label. With
        ``--d_window band`` (default) those two see only a window shared by the batch, centred
        on each sample's hole band: its rows hold the whole band (at least one receptive field of
        the D), its columns the local columns widened to one receptive field (local) or all
        columns (seg). What is cut away is, for ``local``, zeros in fake and real alike and, for
        ``seg``, rows where the target label is zero and where the generated segmentation is never
        used (the composite takes only the inserted band); the per-pixel computation inside is the
        reference's, on a fraction of the pixels.
        """
        fake = self.fake_B.detach() if detach else self.fake_B
        seg = straight_through_binary(self.seg_fine)
        seg = seg.detach() if detach else seg
        real, target, mask = self.real_B, self.target_mask, self.local_mask
        local_fake, local_real = fake, real
        if self.window is not None:
            start, rows, first, stop = self.window
            seg, target = crop_rows(seg, start, rows), crop_rows(target, start, rows)
            mask = crop_rows(mask.expand_as(fake), start, rows)[..., first:stop]
            local_fake = crop_rows(fake, start, rows)[..., first:stop]
            local_real = crop_rows(real, start, rows)[..., first:stop]
        return {
            "global": (fake, real),
            "local": (local_fake * mask, local_real * mask),
            "seg": (seg, target),
        }

    def _D(self, name: str, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.netD[name](self.memory_format(x))

    # --- losses -----------------------------------------------------------------------------
    def generator_loss_names(self) -> list[str]:
        """Every term of :meth:`generator_losses` (all logged losses but the discriminators')."""
        return [name for name in self.loss_names if not name.startswith("D_")]

    def discriminator_losses(self) -> dict[str, torch.Tensor]:
        losses = {}
        for name, (fake, real) in self._discriminator_inputs(detach=True).items():
            loss = 0.5 * (
                self.criterionGAN(self._D(name, fake), False) + self.criterionGAN(self._D(name, real), True)
            )
            if self.opt.gan_mode == "wgangp":
                loss = loss + gradient_penalty(self.netD[name], real, fake)
            losses[f"D_{name}"] = loss
        return losses

    def generator_losses(self) -> dict[str, torch.Tensor]:
        """Every generator term, weighted; their sum is the generator objective."""
        opt, s = self.opt, self.sample
        gan = torch.zeros((), device=self.device)
        if self.adversarial:
            gan = sum(
                self.criterionGAN(self._D(name, fake), True, for_discriminator=False)
                for name, (fake, _) in self._discriminator_inputs(detach=False).items()
            )
        weight = None
        if opt.hgam_loss_weight > 0:
            # HGAM: less reconstruction weight where the classifier saw damage. The CAM in the frame
            # of ct and the composite (the squeezed "cam" is zero on every generated row)
            if "cam_target" not in s:
                raise KeyError("--hgam_loss_weight needs the sample's 'cam_target' (the unshifted CAM)")
            weight = 1.0 - opt.hgam_loss_weight * s["cam_target"]
        l1 = hole_l1(self.fake_B, s["ct"], s["hole"], weight) + hole_l1(
            self.fake_coarse, s["ct"], s["hole"], weight
        )
        height = opt.lambda_height_coarse * height_loss(
            self.out.coarse_height, s["hole_rows"], s["height"]
        ) + opt.lambda_height_fine * height_loss(self.out.fine_height, s["hole_rows"], s["height"])
        return {
            "G_GAN": opt.lambda_GAN * gan,
            "G_L1": opt.lambda_L1 * l1,
            "G_Dice": opt.lambda_dice_fine * dice_loss(self.seg_fine, self.target_mask),
            "coarse_Dice": opt.lambda_dice_coarse * dice_loss(self.seg_coarse, s["neighbour_mask"]),
            "edge": opt.lambda_edge * edge_loss(self.seg_fine, self.target_mask),
            "height": height,
        }

    def _record(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, value in losses.items():
            setattr(self, f"loss_{name}", value.detach())
        return sum(losses.values())

    @property
    def adversarial(self) -> bool:
        """Whether the discriminators take part: ``--lambda_GAN 0`` passes G no adversarial gradient,
        so they are neither run nor trained (their losses are logged as 0; G's step is the same)."""
        return float(self.opt.lambda_GAN) != 0.0

    def optimize_parameters(self) -> None:
        self.forward()
        if self.adversarial:
            self.set_requires_grad(self.netD, True)
            self.optimizer_D.zero_grad(set_to_none=True)
            self._record(self.discriminator_losses()).backward()
            self.optimizer_D.step()
            self.set_requires_grad(self.netD, False)
        else:
            self._record({f"D_{name}": torch.zeros((), device=self.device) for name in D_NAMES})
            # no gradients: Adam changes nothing, and D's learning-rate schedule steps after a step
            self.optimizer_D.zero_grad(set_to_none=True)
            self.optimizer_D.step()
        self.optimizer_G.zero_grad(set_to_none=True)
        self.loss_G = self._record(self.generator_losses())
        self.loss_G.backward()
        self.optimizer_G.step()

    # --- evaluation and inference -------------------------------------------------------------
    def validation_metrics(self) -> dict[str, torch.Tensor]:
        """Per-sample metrics of the last forward pass: masked-region SSIM/PSNR (hole band x the
        data columns ``[col_start, col_stop)``: a coronal slice's padding is left out), Dice of the
        fine and coarse segmentations (thresholded at 0.5), height error in mm."""
        s = self.sample
        return {
            **hole_metrics(self.fake_B, s["ct"], s["hole"], data_columns(s)),
            "dice": soft_dice((self.seg_fine > 0.5).float(), self.target_mask),
            "coarse_dice": soft_dice((self.seg_coarse > 0.5).float(), s["neighbour_mask"]),
            "height_error_mm": (self.rows_fine.float() - s["height"].reshape(-1)).abs()
            * s["row_spacing_mm"].reshape(-1),
        }

    @torch.no_grad()
    def synthesise(self, batch: dict) -> dict[str, torch.Tensor]:
        """Pseudo-healthy synthesis of a batch in the sample contract (G in eval mode, no gradients).

        Returns:
            ``ct`` (B, 1, H, W) fine composite in [-1, 1]: ``batch['ct']`` with its rows [x1, x2)
            replaced by ``rows`` generated rows starting at ``top``; ``seg`` (B, 1, H, W) fine
            segmentation probability in the same composite frame (0 outside the band); ``rows``
            (B,) inserted rows (``fine fraction * hole_rows`` rounded, no floor at the observed
            height); ``top`` (B,) first inserted row. Label maps follow with
            :func:`models.composite.compose` and the same ``x1, x2, rows`` (fill 0).
        """
        was_training = self.netG.training
        self.netG.eval()
        try:
            self.set_input(batch)
            self.forward(rows=composite_rows(self.sample))
        finally:
            self.netG.train(was_training)
        s = self.sample
        seg = compose(self.seg_fine, torch.zeros_like(self.seg_fine), s["x1"], s["x2"], self.rows_fine, 0.0)
        top = compose_top(s["x1"].reshape(-1), s["x2"].reshape(-1), self.rows_fine)
        return {"ct": self.fake_B.float(), "seg": seg, "rows": self.rows_fine, "top": top}

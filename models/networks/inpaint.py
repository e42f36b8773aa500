"""The HealthiVert two-stage inpainting generator (REFERENCE.md section 4.1, DeepFill v1 shape).

Every convolution is a :class:`ConvBlock`: a biased Conv2d under spectral norm, no normalisation
layer, ELU (REFERENCE.md: the paper's figure says Conv+BN+ELU, the code has none). At ngf 16 the
generator has 986,888 parameters (coarse 409,771, fine 577,117), as in REFERENCE.md section 4.5.

* :class:`CoarseGenerator` takes (masked CT, slice-ratio map, hole) and the HGAM guidance
  ``1 - CAM`` (concatenated into its decoder at 1/2 and full resolution); returns the coarse
  image, the coarse segmentation (healthy neighbours) and the height fraction ``p1``.
* :class:`FineGenerator` takes (masked CT, coarse segmentation, hole, slice ratio): a
  hallucination branch of dilated convolutions and an attention branch with per-sample
  contextual attention, merged; the coarse image joins at full resolution before the heads.
  Returns the fine image, the fine segmentation (target vertebra) and the height fraction ``p2``.
  Its image channel is, by default (``fine_input='composite'``), the masked CT with the hole
  filled by the coarse image: DeepFill's coarse-to-fine refinement, the design the paper's
  "two-stage coarse-to-fine" generator follows, so the fine encoders refine the coarse result.
  The reference's code feeds the masked CT there and the coarse image only at the last layer
  (REFERENCE.md sections 4.1 and 11): ``fine_input='masked'``. Same channels and parameters.

Any size works: :class:`InpaintGenerator` pads to multiples of 8 (two stride-2 stages, then
matching at half that resolution) and crops back.
No device is hard-wired.

Rows needed (``rows=(r0, r1)``, inference): the fine stage's decoder (after the merge, whose
global mean feeds the height head) has only 3 x 3 convolutions, so output rows [r0, r1) depend
on :data:`DECODER_MARGIN_QUARTER_ROWS` quarter-resolution rows around them. It then runs on that
window only and the fine outputs outside [r0, r1) are left at -1 (image) and 0 (segmentation);
inside they equal the full computation up to float rounding. The synthesis needs only the rows
of each sample's hole band, about a third of a 256-row slice at 1 mm.

Activation checkpointing (:attr:`InpaintGenerator.checkpointing`, ``--grad_checkpoint``): five
segments (coarse encoder and decoder; fine hallucination branch, attention branch and decoder)
keep only their inputs and outputs for the backward pass and run their forward again there,
which cuts the generator's share of peak memory to about its largest segment for about one
more generator forward per step. The recomputation gives the same values: spectral norm's power
iteration runs once per step (in the first forward), and the recomputation reuses the ``u, v``
vectors it left, as spectral norm does in eval mode.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

from models.networks.contextual_attention import ContextualAttention


class ConvBlock(nn.Module):
    """Spectral-normalised conv ('same' padding for odd kernels) followed by ELU, ReLU or nothing."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, act: str = "elu"):
        super().__init__()
        self.conv = spectral_norm(
            nn.Conv2d(cin, cout, k, stride, padding=dilation * (k - 1) // 2, dilation=dilation)
        )
        self.act = {"elu": nn.ELU(inplace=True), "relu": nn.ReLU(inplace=True), "none": nn.Identity()}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def _dilated(ch: int) -> list[nn.Module]:
    return [ConvBlock(ch, ch, dilation=d) for d in (2, 4, 8, 16)]


class HeightHead(nn.Module):
    """Global average pool -> Linear -> sigmoid: the height as a fraction of the hole."""

    def __init__(self, ch: int):
        super().__init__()
        self.fc = nn.Linear(ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 under any autocast: the band is ceil(fraction x hole rows), and bf16's steps of 1/256
        # near 1 would move it by a row
        with torch.autocast(x.device.type, enabled=False):
            return torch.sigmoid(self.fc(x.float().mean(dim=(2, 3)))).reshape(-1)


# Quarter-resolution rows each side of a window that the fine decoder's output rows depend on:
# two 3 x 3 convs at 1/4 (2 rows), two at 1/2 (1 row at 1/4), two and a head at full (3/4 row).
DECODER_MARGIN_QUARTER_ROWS = 4


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


@contextlib.contextmanager
def _no_power_iteration(module: nn.Module):
    """Spectral norm in ``module`` without a power-iteration step (eval mode), restored on exit."""
    norms = [m for m in module.modules() if type(m).__name__ == "_SpectralNorm"]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.training = False
        yield
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.training = mode


def _segment(stage: nn.Module, fn, *args: torch.Tensor):
    """``fn(*args)``, checkpointed when ``stage.checkpointing`` is set and gradients are recorded;
    the recomputation runs ``stage``'s spectral norms without a power-iteration step."""
    if not (getattr(stage, "checkpointing", False) and torch.is_grad_enabled()):
        return fn(*args)
    contexts = lambda: (contextlib.nullcontext(), _no_power_iteration(stage))  # noqa: E731
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


class CoarseOutput(NamedTuple):
    image: torch.Tensor
    seg: torch.Tensor
    height: torch.Tensor


class CoarseGenerator(nn.Module):
    def __init__(self, ngf: int = 16, in_ch: int = 3):
        super().__init__()
        self.checkpointing = False  # see :func:`_segment`
        c = ngf
        self.encoder = nn.Sequential(
            ConvBlock(in_ch, c, 5),
            ConvBlock(c, 2 * c, 3, 2),
            ConvBlock(2 * c, 2 * c),
            ConvBlock(2 * c, 4 * c, 3, 2),
            ConvBlock(4 * c, 4 * c),
            ConvBlock(4 * c, 4 * c),
            *_dilated(4 * c),
        )
        self.height = HeightHead(4 * c)
        self.middle = nn.Sequential(ConvBlock(4 * c, 4 * c), ConvBlock(4 * c, 4 * c))
        self.dec_half = nn.Sequential(
            ConvBlock(4 * c + 1, 4 * c), ConvBlock(4 * c, 2 * c), ConvBlock(2 * c, 2 * c)
        )
        self.dec_full = nn.Sequential(ConvBlock(2 * c + 1, 2 * c), ConvBlock(2 * c, c), ConvBlock(c, c // 2))
        self.image_head = ConvBlock(c // 2, 1, act="none")
        self.seg_head = ConvBlock(c // 2, 1, act="none")

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> CoarseOutput:
        """``x`` (B, 3, H, W): masked CT, slice ratio, hole; ``guidance`` (B, 1, H, W) = 1 - CAM."""
        z = _segment(self, self.encoder, x)
        return CoarseOutput(*_segment(self, self._decode, z, guidance))

    def _decode(self, z: torch.Tensor, guidance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p = self.height(z)
        z = _up(self.middle(z))
        half = F.interpolate(guidance, size=z.shape[-2:], mode="nearest")
        z = _up(self.dec_half(torch.cat([z, half.to(z.dtype)], 1)))
        z = self.dec_full(torch.cat([z, guidance.to(z.dtype)], 1))
        return self.image_head(z).clamp(-1, 1), torch.sigmoid(self.seg_head(z)), p


class FineGenerator(nn.Module):
    def __init__(self, ngf: int = 16, in_ch: int = 4, skips: bool = False):
        super().__init__()
        self.checkpointing = False  # see :func:`_segment`
        self.skips = skips
        c = ngf
        self.hallucinate = nn.Sequential(
            ConvBlock(in_ch, c, 5),
            ConvBlock(c, c, 3, 2),
            ConvBlock(c, 2 * c),
            ConvBlock(2 * c, 2 * c, 3, 2),
            ConvBlock(2 * c, 4 * c),
            ConvBlock(4 * c, 4 * c),
            *_dilated(4 * c),
        )
        self.attend_in = nn.Sequential(
            ConvBlock(in_ch, c, 5),
            ConvBlock(c, c, 3, 2),
            ConvBlock(c, 2 * c),
            ConvBlock(2 * c, 4 * c, 3, 2),
            ConvBlock(4 * c, 4 * c),
            ConvBlock(4 * c, 4 * c, act="relu"),
        )
        self.attention = ContextualAttention(ksize=3, rate=2, fuse_k=3, softmax_scale=10.0, fuse=True)
        self.attend_out = nn.Sequential(ConvBlock(4 * c, 4 * c), ConvBlock(4 * c, 4 * c))
        self.merge = ConvBlock(8 * c, 4 * c)
        self.height = HeightHead(4 * c)
        self.middle = nn.Sequential(ConvBlock(4 * c, 4 * c), ConvBlock(4 * c, 4 * c))
        # with skips the decoder also reads the hallucination branch's half-resolution (2c) and
        # full-resolution (c) features, U-Net fashion
        self.dec_half = nn.Sequential(ConvBlock(4 * c + 2 * c * skips, 2 * c), ConvBlock(2 * c, 2 * c))
        self.dec_full = nn.Sequential(ConvBlock(2 * c + c * skips, c), ConvBlock(c, c // 2))
        self.image_head = ConvBlock(c // 2 + 1, 1, act="none")
        self.seg_head = ConvBlock(c // 2 + 1, 1, act="none")

    def forward(
        self,
        x: torch.Tensor,
        coarse_image: torch.Tensor,
        hole: torch.Tensor,
        rows: tuple[int, int] | None = None,
    ) -> CoarseOutput:
        """``x`` (B, 4, H, W): masked CT, coarse segmentation, hole, slice ratio; ``rows``: only
        these output rows are needed (module docstring)."""
        a = _segment(self, self._attend, x, hole)
        z, *skips = _segment(self, self._hallucinate, x)
        if rows is None:
            return CoarseOutput(*_segment(self, self._decode, z, a, coarse_image, *skips))
        return CoarseOutput(*self._decode(z, a, coarse_image, *skips, rows=rows))

    def _hallucinate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The hallucination branch's output and, with skips, its half- and full-resolution features."""
        if not self.skips:
            return (self.hallucinate(x),)
        full = self.hallucinate[0](x)
        half = self.hallucinate[1:3](full)
        return self.hallucinate[3:](half), half, full

    def _attend(self, x: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
        return self.attend_out(self.attention(self.attend_in(x), hole))

    def _decode(
        self,
        z: torch.Tensor,
        a: torch.Tensor,
        coarse: torch.Tensor,
        *skips: torch.Tensor,
        rows: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Merge, height head, decoder and heads; with ``rows=(r0, r1)`` the decoder runs on the
        quarter-resolution window those rows depend on and the rest is left at -1 and 0."""
        z = self.merge(torch.cat([z, a], 1))
        p = self.height(z)
        if rows is None:
            return (*self._upsample(z, coarse, *skips), p)
        h, scale = coarse.shape[-2], coarse.shape[-2] // z.shape[-2]
        r0, r1 = max(0, int(rows[0])), min(h, int(rows[1]))
        q0 = max(0, r0 // scale - DECODER_MARGIN_QUARTER_ROWS)
        q1 = min(z.shape[-2], -(-r1 // scale) + DECODER_MARGIN_QUARTER_ROWS)
        w0 = q0 * scale
        # the skip features are whole-image features, cut to the same window at their resolution
        skips = tuple(f[..., q0 * (k := f.shape[-2] // z.shape[-2]) : q1 * k, :] for f in skips)
        part = self._upsample(z[..., q0:q1, :], coarse[..., w0 : q1 * scale, :], *skips)
        image, seg = coarse.new_full(coarse.shape, -1.0), coarse.new_zeros(coarse.shape)
        image[..., r0:r1, :] = part[0][..., r0 - w0 : r1 - w0, :].to(image.dtype)
        seg[..., r0:r1, :] = part[1][..., r0 - w0 : r1 - w0, :].to(seg.dtype)
        return image, seg, p

    def _upsample(
        self, z: torch.Tensor, coarse: torch.Tensor, *skips: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder from the merged quarter-resolution map to the image and segmentation heads;
        ``skips`` (half, full): the hallucination branch's features joined at those resolutions."""
        half, full = skips if skips else (None, None)
        z = _up(self.middle(z))
        z = self.dec_half(z if half is None else torch.cat([z, half], 1))
        z = _up(z)
        z = self.dec_full(z if full is None else torch.cat([z, full], 1))
        z = torch.cat([z, coarse.to(z.dtype)], 1)
        return self.image_head(z).clamp(-1, 1), torch.sigmoid(self.seg_head(z))


# what the fine stage's first channel holds: the masked CT (the reference's code) or the masked CT
# with the hole filled by the coarse image (DeepFill's coarse-to-fine refinement)
FINE_INPUTS = ("masked", "composite")


class GeneratorOutput(NamedTuple):
    coarse_image: torch.Tensor
    coarse_seg: torch.Tensor
    coarse_height: torch.Tensor
    fine_image: torch.Tensor
    fine_seg: torch.Tensor
    fine_height: torch.Tensor


class InpaintGenerator(nn.Module):
    """Coarse then fine stage; inputs as in the sample contract (all (B, 1, H, W) except ``ratio``).

    ``checkpointing`` (default off): recompute each stage's activations in the backward pass
    instead of keeping them (used only when gradients are being recorded).
    """

    def __init__(
        self,
        ngf: int = 16,
        checkpointing: bool = False,
        fine_input: str = "composite",
        fine_skips: bool = False,
    ):
        super().__init__()
        if fine_input not in FINE_INPUTS:
            raise ValueError(f"fine_input must be one of {FINE_INPUTS}, got {fine_input!r}")
        self.coarse = CoarseGenerator(ngf)
        self.fine = FineGenerator(ngf, skips=fine_skips)
        self.checkpointing = checkpointing
        self.fine_input = fine_input

    @property
    def checkpointing(self) -> bool:
        return self.coarse.checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        self.coarse.checkpointing = self.fine.checkpointing = bool(on)

    def forward(
        self,
        ct_masked: torch.Tensor,
        hole: torch.Tensor,
        slice_ratio: torch.Tensor,
        cam: torch.Tensor,
        rows: tuple[int, int] | None = None,
    ) -> GeneratorOutput:
        """Images of any size: padded to multiples of 8 (CT with -1, hole with 1, CAM with 0), then
        cropped back, so the outputs have the input's size. ``rows=(r0, r1)``: only those rows of
        the fine outputs are needed (module docstring; for inference)."""
        b, _, h, w = ct_masked.shape
        pad = (0, -w % 8, 0, -h % 8)
        if any(pad):
            ct_masked = F.pad(ct_masked, pad, value=-1.0)
            hole = F.pad(hole.to(ct_masked.dtype), pad, value=1.0)
            cam = F.pad(cam.to(ct_masked.dtype), pad, value=0.0)
        hp, wp = ct_masked.shape[-2:]
        ratio = slice_ratio.reshape(b, 1, 1, 1).to(ct_masked.dtype).expand(b, 1, hp, wp)
        hole = hole.to(ct_masked.dtype)
        coarse = self.coarse(torch.cat([ct_masked, ratio, hole], 1), 1.0 - cam.to(ct_masked.dtype))
        first = ct_masked
        if self.fine_input == "composite":
            first = ct_masked * (1.0 - hole) + coarse.image.to(ct_masked.dtype) * hole
        fine_in = torch.cat([first, coarse.seg.to(ct_masked.dtype), hole, ratio], 1)
        fine = self.fine(fine_in, coarse.image, hole, rows)
        out = GeneratorOutput(coarse.image, coarse.seg, coarse.height, fine.image, fine.seg, fine.height)
        if any(pad):
            out = out._replace(
                **{
                    k: getattr(out, k)[..., :h, :w]
                    for k in ("coarse_image", "coarse_seg", "fine_image", "fine_seg")
                }
            )
        return out

"""HealthiVert networks, per-sample contextual attention, gradients of EEM and the seg-D, synthesis."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from models.composite import compose, compose_top
from models.healthivert_model import (
    AUTO_CHECKPOINT_PIXELS,
    HealthiVertModel,
    band_window,
    composite_rows,
    crop_rows,
    data_columns,
)
from models.losses.reconstruction import hole_l1
from models.metrics import masked_psnr, masked_ssim
from models.networks.contextual_attention import _diagonal_sum, contextual_attention
from models.networks.inpaint import InpaintGenerator
from models.networks.patchgan import define_D
from options.train_options import TrainOptions
from tests.conftest import use_cuda_precision_on_cpu
from tests.fixtures.synthetic_vertebra import synthetic_sample

DATA = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--gpu_ids", "-1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(tmp_path, *extra, size=32):
    opt = TrainOptions().parse(
        [*DATA, "--model", "healthivert", "--ngf", "8", "--ndf", "8", "--crop_size", str(size)]
        + ["--checkpoints_dir", str(tmp_path), *extra]
    )
    torch.manual_seed(0)
    return HealthiVertModel(opt)


def batch(indices, size=32, cam=False):
    return default_collate([synthetic_sample(i, size, cam=cam) for i in indices])


def test_generator_parameters_match_the_reference():
    g = InpaintGenerator(16)
    n = sum(p.numel() for p in g.parameters())
    assert n == 986_888  # REFERENCE.md section 4.5
    assert sum(p.numel() for p in g.coarse.parameters()) == 409_771
    assert sum(p.numel() for p in define_D(1, 64).parameters()) == 2_763_585


def test_fine_skips_feed_the_decoder_the_hallucination_features(tmp_path):
    """``--fine_skips``: the fine decoder's first half- and full-resolution convolutions also read
    the hallucination branch's 2c and c features (2c x 2c + c x c 3 x 3 kernels more), the option
    reaches the model, and the image depends on the skip channels' weights."""
    plain, skips = InpaintGenerator(16), InpaintGenerator(16, fine_skips=True)
    n = [sum(p.numel() for p in g.parameters()) for g in (plain, skips)]
    assert n[1] - n[0] == (32 * 32 + 16 * 16) * 9
    assert model_for(tmp_path, "--fine_skips").netG.fine.skips and not model_for(tmp_path).netG.fine.skips
    torch.manual_seed(0)
    g = InpaintGenerator(8, fine_skips=True).eval()
    b = batch([0, 1])
    args = (b["ct_masked"], b["hole"], b["slice_ratio"], b["cam"])
    half, full = g.fine._hallucinate(torch.zeros(1, 4, 32, 32))[1:]
    assert half.shape == (1, 16, 16, 16) and full.shape == (1, 8, 32, 32)
    with torch.no_grad():
        before = g(*args).fine_image
        for conv, c_in in ((g.fine.dec_half[0].conv, 32), (g.fine.dec_full[0].conv, 16)):
            w = conv.parametrizations.weight.original
            assert w.shape[1] == c_in + w.shape[0]  # the decoder's own channels, then the skip's
            w[:, c_in:] = 0  # the skips cut: a different image
        assert (g(*args).fine_image - before).abs().max() > 1e-4


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (40, 28)])
def test_generator_and_discriminator_shapes(size):
    h, w = size
    g = InpaintGenerator(8)
    x = torch.rand(2, 1, h, w) * 2 - 1
    out = g(x, torch.zeros(2, 1, h, w), torch.rand(2), torch.zeros(2, 1, h, w))
    for image in (out.coarse_image, out.coarse_seg, out.fine_image, out.fine_seg):
        assert image.shape == (2, 1, h, w)
    assert out.coarse_height.shape == out.fine_height.shape == (2,)
    assert ((out.fine_seg >= 0) & (out.fine_seg <= 1)).all() and out.fine_image.abs().max() <= 1
    assert ((out.fine_height > 0) & (out.fine_height < 1)).all()
    d = define_D(1, 8)(x)
    assert d.shape[:2] == (2, 1) and d.dim() == 4


def _fine_inputs(g: InpaintGenerator, *args) -> tuple[torch.Tensor, object]:
    """The fine stage's input tensor and the generator's output, for ``args``."""
    seen = {}

    def keep(_module, inputs):
        seen["x"] = inputs[0].detach()  # returns None: the inputs go on unchanged

    hook = g.fine.register_forward_pre_hook(keep)
    try:
        out = g(*args)
    finally:
        hook.remove()
    return seen["x"], out


def test_fine_input_composite_fills_the_hole_with_the_coarse_image():
    torch.manual_seed(0)
    h, w = 32, 24
    x = torch.rand(2, 1, h, w) * 2 - 1
    hole = torch.zeros(2, 1, h, w)
    hole[0, :, 8:20], hole[1, :, 4:10] = 1, 1
    args = (x, hole, torch.rand(2), torch.zeros(2, 1, h, w))
    composite = InpaintGenerator(8)  # the default
    masked = copy.deepcopy(composite)
    masked.fine_input = "masked"  # the reference's code
    with torch.no_grad():
        a, out_a = _fine_inputs(masked, *args)
        b, out_b = _fine_inputs(composite, *args)
    assert torch.equal(a[:, :1], x)  # the reference: the masked CT
    inside = hole.bool()
    assert torch.equal(b[:, :1][~inside], x[~inside])  # outside the hole: the masked CT
    assert torch.equal(b[:, :1][inside], out_b.coarse_image[inside])  # inside: the coarse image
    assert torch.equal(a[:, 1:], b[:, 1:])  # coarse seg, hole, slice ratio unchanged
    assert torch.equal(out_a.coarse_image, out_b.coarse_image)
    assert not torch.allclose(out_a.fine_image, out_b.fine_image)
    with pytest.raises(ValueError, match="fine_input"):
        InpaintGenerator(8, fine_input="coarse")


def test_a_run_saved_before_fine_input_existed_keeps_the_masked_input(tmp_path):
    opt = TrainOptions().parse(
        [*DATA, "--model", "healthivert", "--ngf", "8", "--checkpoints_dir", str(tmp_path)]
    )
    assert HealthiVertModel(opt).netG.fine_input == "composite"
    del opt.fine_input  # an opt.json written before the option
    assert HealthiVertModel(opt).netG.fine_input == "masked"


@pytest.mark.parametrize("skips", [False, True])
@pytest.mark.parametrize(("size", "rows"), [((64, 48), (20, 37)), ((40, 28), (0, 9)), ((64, 32), (50, 64))])
def test_generator_rows_window_equals_the_full_decoder(size, rows, skips):
    h, w = size
    g = InpaintGenerator(8, fine_skips=skips).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, h, w, generator=gen) * 2 - 1
    hole = torch.zeros(2, 1, h, w)
    hole[:, :, rows[0] : rows[1]] = 1
    args = (x, hole, torch.rand(2, generator=gen), torch.rand(2, 1, h, w, generator=gen))
    with torch.no_grad():
        full, part = g(*args), g(*args, rows=rows)
    r0, r1 = rows
    for name in ("fine_image", "fine_seg"):
        a, b = getattr(full, name), getattr(part, name)
        assert a[..., r0:r1, :].std() > 1e-4  # not a flat output
        assert torch.allclose(a[..., r0:r1, :], b[..., r0:r1, :], atol=1e-5), name
    assert (part.fine_image[..., :r0, :] == -1).all() and (part.fine_seg[..., r1:, :] == 0).all()
    for name in ("coarse_image", "coarse_seg", "coarse_height", "fine_height"):
        assert torch.allclose(getattr(full, name), getattr(part, name), atol=1e-6), name


def test_synthesis_is_the_full_forward_on_the_composite_rows(tmp_path):
    model = model_for(tmp_path, size=96)
    with torch.no_grad():  # a full-hole height: the composite takes every row the window must hold
        model.netG.fine.height.fc.bias.fill_(20.0)
    data = batch([0, 1, 2], size=96)
    out = model.synthesise(data)
    assert torch.equal(out["rows"], data["hole_rows"].reshape(-1))
    assert (model.out.fine_image == -1).all(dim=(0, 1, 3)).any()  # the decoder ran on a window only
    model.netG.eval()
    model.set_input(data)
    with torch.no_grad():
        model.forward()
    assert torch.allclose(out["ct"], model.fake_B, atol=1e-5)
    assert torch.equal(out["rows"], model.rows_fine)


def test_composite_rows_hold_every_band_and_no_more():
    data = batch([0, 1, 2], size=96)
    r0, r1 = composite_rows(data)
    x1, x2, hole = data["x1"].reshape(-1), data["x2"].reshape(-1), data["hole_rows"].reshape(-1)
    starts, ends = [], []
    for rows in range(int(hole.max()) + 1):
        n = torch.minimum(torch.full_like(hole, rows), hole)
        top = compose_top(x1, x2, n)
        starts.append(int(top.min()))
        ends.append(int((top + n).max()))
    assert (r0, r1) == (min(starts), max(ends))


@pytest.mark.parametrize("hw", [(16, 16), (8, 12)])
def test_contextual_attention_is_per_sample(hw):
    h, w = hw
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, h, w, generator=g)
    holes = torch.zeros(2, 1, 4 * h, 4 * w)
    holes[0, :, 4 : 4 * h // 2] = 1
    holes[1, :, 4 * h // 2 :] = 1
    together = contextual_attention(features, holes)
    assert together.shape == features.shape
    for i in range(2):
        alone = contextual_attention(features[i : i + 1], holes[i : i + 1])
        assert torch.allclose(together[i : i + 1], alone, atol=1e-5)
    # the holes differ, so sample 1 attended with sample 0's hole would differ
    swapped = contextual_attention(features[1:], holes[:1])
    assert not torch.allclose(together[1:], swapped, atol=1e-3)


def deepfill_attention(features, hole, ksize=3, rate=2, fuse_k=3, scale=10.0):
    """DeepFill v1's contextual attention for one sample, as convolutions: background patches
    are the filters that score every position (conv2d) and paste back (conv_transpose2d)."""
    _, c, h, w = features.shape
    hb, wb = h // rate, w // rate
    raw = F.unfold(features, 2 * rate, padding=rate // 2, stride=rate)
    raw = raw.reshape(c, 2 * rate, 2 * rate, -1).permute(3, 0, 1, 2)
    down = F.interpolate(features, size=(hb, wb), mode="nearest")
    patches = F.unfold(down, ksize, padding=ksize // 2).reshape(c, ksize, ksize, -1).permute(3, 0, 1, 2)
    patches = patches / patches.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-4)
    m = F.unfold(F.adaptive_max_pool2d(hole, (hb, wb)), ksize, padding=ksize // 2).amax(1)
    valid = (m == 0).float().reshape(1, hb * wb, 1, 1)
    score = F.conv2d(down, patches, padding=ksize // 2)  # (1, L, hb, wb)
    eye = torch.eye(fuse_k).reshape(1, 1, fuse_k, fuse_k)
    s = F.conv2d(score.reshape(1, 1, hb * wb, hb * wb), eye, padding=fuse_k // 2)
    s = s.reshape(1, hb, wb, hb, wb).permute(0, 2, 1, 4, 3).reshape(1, 1, hb * wb, hb * wb)
    s = F.conv2d(s, eye, padding=fuse_k // 2)
    s = s.reshape(1, wb, hb, wb, hb).permute(0, 2, 1, 4, 3).reshape(1, hb * wb, hb, wb)
    attention = F.softmax(s * valid * scale, dim=1) * valid
    return F.conv_transpose2d(attention, raw, stride=rate, padding=rate // 2) / 4.0


@pytest.mark.parametrize("hw", [(16, 16), (8, 12)])
def test_contextual_attention_matches_the_convolution_form(hw):
    h, w = hw
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 4, h, w, generator=g)
    holes = torch.zeros(2, 1, 4 * h, 4 * w)
    holes[0, :, 8 : 4 * h // 2] = 1
    holes[1, :, :, 4 * w // 2 :] = 1
    out = contextual_attention(features, holes)
    for i in range(2):
        expected = deepfill_attention(features[i : i + 1], holes[i : i + 1])
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)


def test_contextual_attention_scores_stay_fp32_under_autocast():
    """bf16 scores times the softmax scale (10) were 5x further off; only the final paste is bf16 now."""
    g = torch.Generator().manual_seed(3)
    features = 2.0 * torch.randn(2, 16, 32, 32, generator=g)
    holes = torch.zeros(2, 1, 32, 32)
    holes[:, :, 12:20] = 1
    exact = contextual_attention(features, holes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contextual_attention(features, holes)
    relative = ((mixed.float() - exact).abs().mean() / exact.abs().mean()).item()
    assert relative < 0.004, relative  # 0.0018 now; 0.0088 with bf16 scores


def test_height_heads_stay_fp32_under_autocast():
    """ceil(fraction x hole rows) sets the band: a bf16 fraction (steps of 1/256) moved it by a row."""
    torch.manual_seed(0)
    G = InpaintGenerator(8).eval()
    args = (
        torch.rand(1, 1, 64, 64) * 2 - 1,
        torch.zeros(1, 1, 64, 64),
        torch.rand(1),
        torch.zeros(1, 1, 64, 64),
    )
    args[1][..., 24:40, :] = 1
    with torch.no_grad():
        exact = G(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = G(*args)
    for name in ("coarse_height", "fine_height"):
        assert getattr(mixed, name).dtype == torch.float32
    head = G.coarse.height
    z = torch.randn(4, head.fc.in_features, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(z.to(torch.bfloat16))
    assert got.dtype == torch.float32
    assert torch.allclose(got, head(z.to(torch.bfloat16).float()), atol=1e-7)
    assert exact.fine_height.dtype == torch.float32


def grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_edge_loss_and_seg_discriminator_train_the_generator(tmp_path):
    model = model_for(tmp_path)
    model.set_input(batch([0, 1]))
    model.forward()
    losses = model.generator_losses()
    assert set(losses) == {"G_GAN", "G_L1", "G_Dice", "coarse_Dice", "edge", "height"}
    losses["edge"].backward()
    assert grad_norm(model.netG.fine.seg_head) > 0 and grad_norm(model.netG.fine.hallucinate) > 0
    model.netG.zero_grad()
    model.forward()
    seg_fake, _ = model._discriminator_inputs(detach=False)["seg"]  # the training path (window)
    seg_term = model.criterionGAN(model.netD["seg"](seg_fake), True, False)
    seg_term.backward()
    assert grad_norm(model.netG.fine.seg_head) > 0
    # the height heads learn through the height loss only (the composite's rounding passes no gradient)
    model.netG.zero_grad()
    model.forward()
    model.generator_losses()["height"].backward()
    assert model.netG.coarse.height.fc.weight.grad.abs().sum() > 0


def test_band_window_holds_every_band():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows_img = int(torch.randint(24, 300, (1,), generator=g))
        n = int(torch.randint(1, 5, (1,), generator=g))
        height = torch.randint(1, rows_img + 1, (n,), generator=g)
        top = (torch.rand(n, generator=g) * (rows_img - height + 1)).long()
        min_rows = int(torch.randint(1, 80, (1,), generator=g))
        start, rows = band_window(top, top + height, rows_img, min(min_rows, rows_img))
        assert rows == min(rows_img, -(-max(int(height.max()), min_rows) // 8) * 8)
        assert (start >= 0).all() and (start + rows <= rows_img).all()
        assert (start <= top).all() and (start + rows >= top + height).all()
    x = torch.arange(2 * 10 * 3.0).reshape(2, 1, 10, 3).requires_grad_(True)
    crop = crop_rows(x, torch.tensor([1, 4]), 5)
    assert torch.equal(crop[0], x[0, :, 1:6].detach()) and torch.equal(crop[1], x[1, :, 4:9].detach())
    crop.sum().backward()
    assert x.grad.sum() == 2 * 5 * 3


def test_local_and_seg_discriminators_see_the_band_window(tmp_path):
    """The window drops only what the reference's full-size inputs hold outside the hole band:
    zeros (local) and rows the target label and the composite never use (seg)."""
    size = 160
    b = batch([0, 1], size=size)
    full = model_for(tmp_path, "--d_window", "full", size=size)
    full.set_input(b)
    full.forward()
    window = model_for(tmp_path, size=size)
    window.set_input(b)
    window.forward()
    assert torch.equal(full.fake_B, window.fake_B)
    f, w = full._discriminator_inputs(detach=True), window._discriminator_inputs(detach=True)
    assert f["local"][0].shape == (2, 1, size, size) and f["seg"][0].shape == (2, 1, size, size)
    wl, ws = w["local"][0], w["seg"][0]
    assert wl.shape[-2] == ws.shape[-2] == 72 and wl.shape[-1] == 70 and ws.shape[-1] == size
    for full_x, window_x in (*zip(f["local"], w["local"], strict=True), (f["seg"][1], w["seg"][1])):
        # local fake and real, and the seg target: the window holds everything that is not zero
        assert full_x.abs().sum() > 0
        assert torch.allclose(full_x.abs().sum((1, 2, 3)), window_x.abs().sum((1, 2, 3)))
    start, rows = window.window[:2]
    assert torch.equal(ws, crop_rows(f["seg"][0], start, rows))  # the generated seg: the band's rows
    window.optimize_parameters()  # a full step on the windows
    assert all(torch.isfinite(torch.tensor(list(window.get_current_losses().values()))))


@pytest.mark.parametrize("skips", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(skips):
    """Recomputing the stages in the backward pass changes neither the gradients nor spectral
    norm's power-iteration vectors (one step per forward, as without checkpointing)."""
    torch.manual_seed(0)
    plain = InpaintGenerator(8, fine_skips=skips)
    recomputed = copy.deepcopy(plain)
    recomputed.checkpointing = True
    b = batch([0, 1])
    for net in (plain, recomputed):
        out = net(b["ct_masked"], b["hole"], b["slice_ratio"], b["cam"])
        loss = out.fine_image.sum() + out.coarse_seg.sum() + out.fine_seg.pow(2).sum() + out.fine_height.sum()
        loss.backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    for (name, u), v in zip(plain.named_buffers(), recomputed.buffers(), strict=True):
        assert torch.equal(u, v), name
    assert recomputed.fine.image_head.conv.parametrizations.weight[0].training  # mode restored


def test_auto_checkpointing_only_for_large_cpu_batches(tmp_path):
    """``--grad_checkpoint auto`` recomputes activations on the CPU for big batches only."""
    model = model_for(tmp_path)  # auto is the default
    model.set_input(batch([0, 1]))
    assert not model.netG.checkpointing
    big = {
        k: (v.repeat(1, 1, 64, 64) if torch.is_tensor(v) and v.dim() == 4 else v)
        for k, v in batch([0] * 6).items()
    }
    assert big["ct"].numel() >= AUTO_CHECKPOINT_PIXELS
    model.set_input(big)
    assert model.netG.checkpointing
    assert not model_for(tmp_path, "--grad_checkpoint", "off").netG.checkpointing
    assert model_for(tmp_path, "--grad_checkpoint", "on").netG.checkpointing


@pytest.mark.parametrize("k", [3, 5])
def test_attention_fusion_equals_the_identity_convolution(k):
    s = torch.randn(2, 1, 37, 37)
    eye = torch.eye(k).reshape(1, 1, k, k)
    assert torch.allclose(_diagonal_sum(s, k), torch.nn.functional.conv2d(s, eye, padding=k // 2), atol=1e-6)


def test_l1_term_does_not_change_with_batch_size(tmp_path):
    model = model_for(tmp_path)
    model.netG.eval()  # spectral norm without power iteration, so both passes use the same weights
    values = []
    for indices in ([3], [3, 3, 3]):
        model.set_input(batch(indices))
        model.forward()
        values.append(model.generator_losses()["G_L1"].item())
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def l1_gradient(tmp_path, weight, b):
    """G_L1 and its gradient over G's parameters at ``--hgam_loss_weight weight`` on batch ``b``."""
    model = model_for(tmp_path, "--hgam_loss_weight", str(weight))
    model.netG.eval()  # spectral norm without power iteration: the same weights in every call
    model.set_input(b)
    model.forward()
    l1 = model.generator_losses()["G_L1"]
    grads = torch.autograd.grad(l1, list(model.netG.parameters()), allow_unused=True)
    return l1, torch.cat([g.flatten() for g in grads if g is not None])


def test_hgam_weight_down_weights_the_l1_gradient_where_the_target_cam_is_high(tmp_path):
    b = batch([0, 1, 2], cam=True)
    rows = torch.arange(32).reshape(1, 32)
    on_target = (rows >= b["x1"]) & (rows < b["x2"])  # (B, H): the generated rows lie here
    assert all(b["cam_target"][i, 0][on_target[i]].sum() > 0 for i in range(3))
    assert all(b["cam"][i, 0][on_target[i]].sum() == 0 for i in range(3))  # squeezed: zero there
    l1_off, g_off = l1_gradient(tmp_path, 0.0, b)
    l1_on, g_on = l1_gradient(tmp_path, 0.9, b)
    assert l1_on < l1_off and (g_on - g_off).abs().max() > 1e-3 * g_off.abs().max()
    # the weight is 1 - w * cam_target on the ground-truth frame of ct and the composite
    model = model_for(tmp_path, "--hgam_loss_weight", "0.9")
    model.netG.eval()
    model.set_input(b)
    model.forward()
    weight = 1 - 0.9 * b["cam_target"]
    fine, coarse = (hole_l1(x, b["ct"], b["hole"], weight) for x in (model.fake_B, model.fake_coarse))
    expect = model.opt.lambda_L1 * (fine + coarse)
    assert model.generator_losses()["G_L1"].item() == pytest.approx(expect.item(), rel=1e-6)
    # without a CAM on the target (or with w = 0, the default) the gradient is the unweighted one, bit for bit
    flat = dict(b, cam_target=torch.zeros_like(b["cam_target"]))
    l1_flat, g_flat = l1_gradient(tmp_path, 0.9, flat)
    assert torch.equal(l1_flat, l1_off) and torch.equal(g_flat, g_off)
    assert model_for(tmp_path).opt.hgam_loss_weight == 0


def test_hgam_without_the_target_cam_is_an_error(tmp_path):
    model = model_for(tmp_path, "--hgam_loss_weight", "0.5")
    b = batch([0, 1], cam=True)
    del b["cam_target"]
    model.set_input(b)
    model.forward()
    with pytest.raises(KeyError, match="cam_target"):
        model.generator_losses()


def test_validation_metrics_leave_out_the_padding_columns(tmp_path):
    model = model_for(tmp_path)
    model.netG.eval()
    b = batch([0, 1, 2])
    b["col_start"] = torch.tensor([[6], [10], [0]])  # coronal: data in [col_start, col_stop), padded
    b["col_stop"] = torch.tensor([[26], [22], [32]])
    with torch.no_grad():
        model.set_input(b)
        model.forward()
        metrics = model.validation_metrics()
        data = data_columns(model.sample)
        assert data.shape == (3, 1, 1, 32) and data.sum((1, 2, 3)).tolist() == [20, 12, 32]
        region = b["hole"] * data
        assert torch.allclose(metrics["psnr"], masked_psnr(model.fake_B, b["ct"], region))
        assert not torch.allclose(metrics["psnr"][:2], masked_psnr(model.fake_B, b["ct"], b["hole"])[:2])
        # what the generator puts in the padding columns changes nothing
        model.fake_B = model.fake_B * data + (1 - data) * torch.rand_like(model.fake_B)
        again = model.validation_metrics()
    for name in ("psnr", "ssim"):
        assert torch.equal(metrics[name], again[name]), name


def test_validation_metrics_without_column_range_use_every_column(tmp_path):
    model = model_for(tmp_path)
    model.netG.eval()
    b = batch([0, 1])
    with torch.no_grad():
        model.set_input(b)
        model.forward()
        metrics = model.validation_metrics()
    assert torch.equal(metrics["psnr"], masked_psnr(model.fake_B, b["ct"], b["hole"]))
    assert torch.equal(metrics["ssim"], masked_ssim(model.fake_B, b["ct"], b["hole"]))


def test_one_step_updates_every_network_and_reports_losses(tmp_path):
    model = model_for(tmp_path, "--hgam_loss_weight", "0.5", "--gan_mode", "hinge")
    model.setup(model.opt)
    before = {k: v.clone() for k, v in model.netD.state_dict().items()}
    model.set_input(batch([0, 1, 2], cam=True))
    model.optimize_parameters()
    losses = model.get_current_losses()
    assert list(losses) == model.loss_names and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert any(not torch.equal(before[k], v) for k, v in model.netD.state_dict().items())
    model.compute_visuals()
    visuals = model.get_current_visuals()
    assert {"real_A", "fake_coarse", "fake_B", "real_B", "cam", "seg_fine", "edge_fake"} <= set(visuals)
    metrics = model.validation_metrics()
    assert set(metrics) == {"ssim", "psnr", "dice", "coarse_dice", "height_error_mm"}
    assert all(v.shape == (3,) for v in metrics.values())


def test_synthesise_follows_the_contract(tmp_path):
    model = model_for(tmp_path)
    b = batch([0, 5])
    out = model.synthesise(b)
    assert set(out) == {"ct", "seg", "rows", "top"}
    assert out["ct"].shape == out["seg"].shape == (2, 1, 32, 32) and out["rows"].dtype == torch.int64
    rows, top = out["rows"], out["top"]
    assert ((rows >= 1) & (rows <= b["hole_rows"].reshape(-1))).all()
    for i in range(2):
        # above the inserted band: the real slice, ending with the row just above the target
        x1 = int(b["x1"][i])
        t = int(top[i])
        if t > 0 and x1 - 1 >= 0:
            assert torch.equal(out["ct"][i, 0, t - 1], b["ct"][i, 0, x1 - 1])
        assert (out["seg"][i, 0, :t] == 0).all() and (out["seg"][i, 0, t + int(rows[i]) :] == 0).all()
    labels = compose(b["target_mask"], b["target_mask"], b["x1"], b["x2"], rows, 0.0)
    assert labels.shape == (2, 1, 32, 32)
    assert model.netG.training  # the model's mode is restored


@pytest.mark.parametrize("gan_mode", ["vanilla", "wgangp"])
def test_mixed_precision_path_on_cpu(tmp_path, monkeypatch, gan_mode):
    """The CUDA path (bf16 autocast, channels_last) run on the CPU: every loss within 0.5 % (or
    0.01) of fp32 from the same weights and batch, a finite training step, fp32 synthesis close to
    fp32's. Catches a dtype mix-up in the mixed-precision code without a GPU."""
    extra = ["--gan_mode", gan_mode, "--hgam_loss_weight", "0.5"]
    b, later = batch([0, 1, 2, 3], size=64, cam=True), batch([0, 1], size=64, cam=True)
    results = []
    for amp in (False, True):
        if amp:
            use_cuda_precision_on_cpu(monkeypatch)
        model = model_for(tmp_path, *extra, size=64)
        assert model.use_amp == amp
        model.set_input(b)
        with torch.no_grad():
            model.forward()
            losses = {k: float(v) for k, v in model.generator_losses().items()}
        model.optimize_parameters()
        assert torch.isfinite(torch.tensor(list(model.get_current_losses().values()))).all()
        out = model.synthesise(later)
        assert out["ct"].dtype == torch.float32 and out["seg"].dtype == torch.float32
        results.append((losses, out))
    (exact, exact_out), (mixed, mixed_out) = results
    for name, value in exact.items():
        assert abs(mixed[name] - value) <= max(0.005 * abs(value), 0.01), (name, value, mixed[name])
    assert (mixed_out["ct"] - exact_out["ct"]).abs().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_channels_last_step(tmp_path):
    opt = TrainOptions().parse(
        ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--model", "healthivert", "--gpu_ids", "0"]
        + ["--ngf", "8", "--ndf", "8", "--checkpoints_dir", str(tmp_path)]
    )
    model = HealthiVertModel(opt)
    assert model.use_amp
    model.set_input(batch([0, 1, 2, 3], size=64))
    model.optimize_parameters()
    assert all(torch.isfinite(torch.tensor(list(model.get_current_losses().values()))))
    out = model.synthesise(batch([0, 1], size=64))
    assert out["ct"].dtype == torch.float32 and out["ct"].device.type == "cuda"


def test_an_hgam_weight_above_one_is_refused(tmp_path):
    """1 - w x CAM below 0 turns the L1 into a reward for errors where the CAM is high."""
    with pytest.raises(ValueError, match="--hgam_loss_weight must be in \\[0, 1\\], got 3"):
        model_for(tmp_path, "--hgam_loss_weight", "3")


def test_without_adversarial_weight_the_discriminators_sit_out_and_g_steps_the_same(tmp_path, monkeypatch):
    data = batch([0, 1])
    skip = model_for(tmp_path, "--lambda_GAN", "0")
    full = model_for(tmp_path, "--lambda_GAN", "0")  # the same weights (seed 0)
    d_before = copy.deepcopy(skip.netD.state_dict())
    schedule = torch.optim.lr_scheduler.LambdaLR(skip.optimizer_D, lambda _: 1.0)
    skip.set_input(data)
    skip.optimize_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # D's schedule steps after an optimiser step, as in training
        schedule.step()
    assert not skip.optimizer_D.state  # that step had no gradients: Adam changed nothing
    with monkeypatch.context() as m:  # the step as it ran before: D trained, G's GAN term times 0
        m.setattr(HealthiVertModel, "adversarial", property(lambda self: True))
        full.set_input(data)
        full.optimize_parameters()
    for (name, a), b in zip(skip.netG.state_dict().items(), full.netG.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(torch.equal(v, d_before[k]) for k, v in skip.netD.state_dict().items())
    assert any(not torch.equal(v, d_before[k]) for k, v in full.netD.state_dict().items())
    losses = skip.get_current_losses()
    assert losses["D_global"] == losses["D_local"] == losses["D_seg"] == losses["G_GAN"] == 0.0
    assert losses["G_L1"] > 0

"""Known values of every HealthiVert loss and metric, the SHRM composite, and batch-size independence."""

import math

import pytest
import torch

from models.composite import compose, compose_top
from models.losses.dice import dice_loss, soft_dice
from models.losses.edge import edge_loss, sobel_magnitude
from models.losses.gan import GANLoss
from models.losses.height import height_loss, predicted_rows, relative_height_error
from models.losses.reconstruction import hole_l1
from models.metrics import masked_psnr, masked_ssim


def band(h=16, w=8, top=6, rows=4, batch=1):
    m = torch.zeros(batch, 1, h, w)
    m[..., top : top + rows, :] = 1
    return m


def test_hole_l1_known_value_and_independent_of_batch_size():
    target = torch.zeros(1, 1, 16, 8)
    pred = target + 0.5
    hole = band()
    # sum |diff| = 0.5 * 16 * 8, hole pixels = 4 * 8
    assert hole_l1(pred, target, hole).item() == pytest.approx(0.5 * 16 / 4)
    assert hole_l1(pred.repeat(5, 1, 1, 1), target.repeat(5, 1, 1, 1), hole.repeat(5, 1, 1, 1)).item() == (
        pytest.approx(2.0)
    )
    # each sample normalised by its own hole
    holes = torch.cat([band(rows=4), band(rows=8)])
    expected = (0.5 * 128 / 32 + 0.5 * 128 / 64) / 2
    assert hole_l1(pred.repeat(2, 1, 1, 1), target.repeat(2, 1, 1, 1), holes).item() == pytest.approx(
        expected
    )
    weight = torch.full_like(target, 0.5)
    assert hole_l1(pred, target, hole, weight).item() == pytest.approx(1.0)


def test_soft_dice_known_values():
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1
    assert dice_loss(m, m).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(m, 1 - m).item() == pytest.approx(1.0, abs=1e-6)
    p = torch.full((1, 1, 2, 2), 0.5)
    g = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # (2 * 1 + s) / (2 + 2 + s)
    assert soft_dice(p, g).item() == pytest.approx(0.5, abs=1e-5)


def test_sobel_and_edge_loss_known_values():
    assert sobel_magnitude(torch.ones(1, 1, 6, 6)).abs().max().item() < 1e-5
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1
    edges = sobel_magnitude(step)
    assert torch.allclose(edges[0, 0, :, 3:5], torch.ones(8, 2), atol=1e-5)  # |gx| = 4, clipped to 1
    assert edges[0, 0, :, :3].abs().max() < 1e-5 and edges[0, 0, :, 5:].abs().max() < 1e-5
    assert edge_loss(step, step).item() == pytest.approx(0.0, abs=1e-8)
    assert edge_loss(torch.zeros_like(step), step).item() == pytest.approx(2 / 8, abs=1e-5)


def test_edge_loss_gradient_flows_through_the_soft_segmentation():
    logits = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    edge_loss(torch.sigmoid(logits), target).backward()
    assert logits.grad.abs().sum() > 0


def test_height_loss_known_values_and_rows_have_no_floor():
    fraction = torch.tensor([0.5, 0.25])
    rows = torch.tensor([[20], [40]])
    h = torch.tensor([[8.0], [10.0]])
    assert relative_height_error(fraction, rows, h).tolist() == pytest.approx([0.25, 0.0])
    assert height_loss(fraction, rows, h).item() == pytest.approx(0.125)
    # 0.3 * 20 = 6 rows even though the observed height is 8: no floor at the observed height
    assert predicted_rows(torch.tensor([0.3]), torch.tensor([20])).tolist() == [6]
    assert predicted_rows(torch.tensor([0.0]), torch.tensor([20])).tolist() == [1]
    # the reference's ceil by default, the nearest row (halves up) on request
    fractions, holes = torch.tensor([0.31, 0.33, 0.375, 0.99]), torch.tensor([20, 20, 20, 40])
    assert predicted_rows(fractions, holes).tolist() == [7, 7, 8, 40]
    assert predicted_rows(fractions, holes, "round").tolist() == [6, 7, 8, 40]
    with pytest.raises(ValueError, match="rounding"):
        predicted_rows(fractions, holes, "floor")


def test_gan_loss_known_values():
    zeros = torch.zeros(2, 1, 3, 3)
    assert GANLoss("vanilla")(zeros, True).item() == pytest.approx(math.log(2))
    assert GANLoss("lsgan")(zeros, True).item() == pytest.approx(1.0)
    assert GANLoss("hinge")(zeros, False).item() == pytest.approx(1.0)


def test_masked_metrics_known_values():
    target = torch.zeros(2, 1, 16, 16)
    mask = band(16, 16, 4, 6, batch=2)
    assert masked_psnr(target + 0.1, target, mask).tolist() == pytest.approx([10 * math.log10(4 / 0.01)] * 2)
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    assert masked_ssim(image, image, mask).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (masked_ssim(image, torch.zeros_like(image), mask) < 0.1).all()


def test_compose_known_rows_identity_fill_and_gradient():
    h = 12
    original = torch.arange(h, dtype=torch.float32).reshape(1, 1, h, 1).repeat(2, 1, 1, 3)
    generated = torch.full_like(original, 100.0, requires_grad=True)
    x1, x2 = torch.tensor([4, 5]), torch.tensor([8, 8])
    # rows = x2 - x1: unchanged outside the target
    same = compose(generated, original, x1, x2, x2 - x1, -1.0)
    for b in range(2):
        assert torch.equal(same[b, 0, : x1[b], 0], original[b, 0, : x1[b], 0])
        assert torch.equal(same[b, 0, x2[b] :, 0], original[b, 0, x2[b] :, 0])
        assert (same[b, 0, x1[b] : x2[b], 0] == 100).all()
    # sample 0: 6 rows instead of 4 -> top = 6 - 3 = 3; above = original [1, 4); below from row 8 on
    out = compose(generated, original, x1, x2, torch.tensor([6, 1]), -1.0)
    assert out[0, 0, :, 0].tolist() == [1, 2, 3, 100, 100, 100, 100, 100, 100, 8, 9, 10]
    # sample 1: 1 row: top = 6; above = original [5 - 6, 5) (first row from outside -> fill)
    assert out[1, 0, :, 0].tolist() == [-1, 0, 1, 2, 3, 4, 100, 8, 9, 10, 11, -1]
    assert compose_top(x1, x2, torch.tensor([6, 1])).tolist() == [3, 6]
    out.sum().backward()
    assert generated.grad[0, 0, :, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]

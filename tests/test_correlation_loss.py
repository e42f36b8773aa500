"""Known values of the correlation-coefficient loss (global and local)."""

from __future__ import annotations

import pytest
import torch

from models.losses.correlation import correlation_coefficient, correlation_loss, local_correlation_map


@pytest.fixture()
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.nn.functional.avg_pool2d(torch.rand(2, 1, 36, 36, generator=g), 5, stride=1)


@pytest.mark.parametrize("window", [0, 5])
def test_optimum_for_itself_and_positive_affine_copy(image, window):
    assert correlation_loss(image, image, window).item() == pytest.approx(0.0, abs=1e-3)
    assert correlation_loss(image, 3.5 * image - 0.7, window).item() == pytest.approx(0.0, abs=1e-3)


def test_worst_for_inverted_copy(image):
    assert correlation_loss(image, -image).item() == pytest.approx(2.0, abs=1e-3)
    assert correlation_loss(image, 1.0 - 2.0 * image, window=5).item() == pytest.approx(4.0, abs=1e-2)
    unrelated = torch.rand(image.shape, generator=torch.Generator().manual_seed(5))
    assert 0.5 < correlation_loss(image, unrelated).item() < 1.5


def test_coefficient_range_and_local_map_shape(image):
    r = correlation_coefficient(image, image.flip(-1))
    assert r.shape == (2,) and torch.all(r.abs() <= 1.0)
    assert local_correlation_map(image, image, 7).shape == (2, 1, 26, 26)
    with pytest.raises(ValueError):
        local_correlation_map(image, image, 1)


@pytest.mark.parametrize("window", [0, 5])
def test_finite_gradient_on_constant_images(window):
    constant = torch.full((1, 1, 16, 16), 0.3, requires_grad=True)
    other = torch.full((1, 1, 16, 16), -0.2, requires_grad=True)
    loss = correlation_loss(constant, other, window)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(constant.grad).all() and torch.isfinite(other.grad).all()
    textured = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    constant.grad = None
    correlation_loss(constant, textured, window).backward()
    assert torch.isfinite(constant.grad).all()

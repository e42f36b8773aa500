"""A hole the dataset shifted to keep it inside the image: the same generator input gives the same
inserted rows, wherever the target lies (the generator cannot see the shift).

``data.vertebra_sample.hole_band`` keeps the hole inside the image: for a target within half a
hole of the top (or bottom) row the hole is shifted down (up), so it is no longer centred on the
target's middle row ``c``. The composite (``models.composite.compose``) always takes the inserted
rows centred on ``c``. Two samples whose generator inputs are identical can then ask for the
vertebra at different rows of the generator's output: a target the generator cannot meet.
"""

import math

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from data.vertebra_sample import build_sample
from models.healthivert_model import composite_rows, generator_shift
from tests.test_healthivert_model import model_for

SIZE = 64
HOLE = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def _as_tensors(sample: dict) -> dict:
    s = {k: torch.as_tensor(v) for k, v in sample.items()}
    s["slice_ratio"] = torch.tensor([0.1])
    s["row_spacing_mm"] = torch.tensor([1.0])
    return s


def translated_pair() -> dict:
    """Two slices, the second the first moved down by 3 rows: targets at rows [2, 10) and [5, 13)
    (middle rows 6 and 9, both less than HOLE // 2 from the top), so both holes are shifted to
    [0, HOLE) and the squeezed inputs are the same image."""
    rng = np.random.RandomState(0)
    ct = (rng.rand(SIZE + 3, SIZE) * 255).astype(np.uint8)
    labels = np.zeros((SIZE + 3, SIZE), np.uint8)
    labels[5:13, 10:50] = 20  # the target
    labels[16:30, 10:50] = 21  # its lower neighbour
    samples = [
        _as_tensors(build_sample(ct[off : off + SIZE], labels[off : off + SIZE], 20, HOLE, [21]))
        for off in (3, 0)
    ]
    return default_collate(samples)


def test_same_generator_input_gives_the_same_inserted_rows(tmp_path):
    b = translated_pair()
    assert b["x1"].reshape(-1).tolist() == [2, 5] and b["band_top"].reshape(-1).tolist() == [0, 0]
    for key in ("ct_masked", "hole", "cam", "slice_ratio"):
        assert torch.equal(b[key][0], b[key][1]), key  # the generator cannot tell them apart
    # and the vertebra to insert is the same
    assert torch.equal(b["ct"][0, :, 2:10], b["ct"][1, :, 5:13])
    model = model_for(tmp_path, size=SIZE)
    model.netG.eval()
    with torch.no_grad():  # both heads predict the true height, 8 rows of the 20-row hole
        for head in (model.netG.coarse.height, model.netG.fine.height):
            head.fc.weight.zero_()
            head.fc.bias.fill_(math.log(0.39 / 0.61))
        model.set_input(b)
        model.forward()
    assert model.rows_fine.tolist() == [8, 8] and model.rows_coarse.tolist() == [8, 8]
    fine, coarse = model.fake_B, model.fake_coarse
    assert fine[0, :, 2:10].std() > 1e-3  # not a flat band
    # the same generator output must give the same inserted vertebra, wherever the target sits
    assert torch.allclose(fine[0, :, 2:10], fine[1, :, 5:13], atol=1e-6)
    assert torch.allclose(coarse[0, :, 2:10], coarse[1, :, 5:13], atol=1e-6)
    # and the same reconstruction error on it
    err = [(fine[i, :, a : a + 8] - b["ct"][i, :, a : a + 8]).abs().sum() for i, a in ((0, 2), (1, 5))]
    assert err[0].item() == pytest.approx(err[1].item(), rel=1e-5)
    # the fine segmentation is compared with the target in the same frame for both
    seg = model.seg_fine
    assert torch.allclose(seg[0, :, 2:10], seg[1, :, 5:13], atol=1e-6)


def test_synthesis_window_holds_the_shifted_band(tmp_path):
    """synthesise() computes only the generator rows the composite takes; with a shifted hole
    those rows are the hole's, and the result is still the full forward pass's."""
    b = translated_pair()
    assert generator_shift(b).tolist() == [4, 1]
    r0, r1 = composite_rows(b)
    assert (r0, r1) == (0, HOLE)  # the hole [0, 20) of both samples, in the generator's frame
    model = model_for(tmp_path, size=SIZE)
    for bias in (20.0, 0.0, -20.0):  # full hole, half, one row
        with torch.no_grad():
            model.netG.fine.height.fc.bias.fill_(bias)
        out = model.synthesise(b)
        model.netG.eval()
        model.set_input(b)
        with torch.no_grad():
            model.forward()
        model.netG.train()
        assert torch.equal(out["rows"], model.rows_fine)
        assert torch.allclose(out["ct"], model.fake_B, atol=1e-5), bias

"""The pix2pix baseline on HealthiVert samples: shapes at two sizes, one training step, padding."""

import pytest
import torch
from torch.utils.data import default_collate

from models.pix2pix_model import Pix2PixModel
from options.test_options import TestOptions
from options.train_options import TrainOptions
from tests.fixtures.synthetic_vertebra import synthetic_sample

ARGS = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--model", "pix2pix", "--gpu_ids", "-1"]
ARGS += ["--ngf", "8", "--ndf", "8", "--netG", "unet_128"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [32, 48])
def test_pix2pix_step_and_shapes(tmp_path, size):
    opt = TrainOptions().parse([*ARGS, "--checkpoints_dir", str(tmp_path)])
    torch.manual_seed(0)
    model = Pix2PixModel(opt)
    model.set_input(default_collate([synthetic_sample(i, size) for i in range(2)]))
    before = [p.clone() for p in model.netG.parameters()]
    model.optimize_parameters()
    assert model.fake_B.shape == (2, 1, size, size)
    assert model.fake_B.abs().max() <= 1
    losses = model.get_current_losses()
    assert set(losses) == {"G_GAN", "G_L1", "D_real", "D_fake"}
    assert losses["G_GAN"] > 0 and losses["G_L1"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.netG.parameters(), strict=True))
    assert set(model.validation_metrics()) == {"ssim", "psnr"}


def test_pix2pix_defaults_and_reference_flags_parse(tmp_path):
    opt = TestOptions().parse(
        [
            "--model",
            "pix2pix",
            "--direction",
            "BtoA",
            "--dataset_mode",
            "aligned_sagittal",
            "--vertebra_json",
            "v.json",
        ]
        + ["--cam_folder", "h", "--vert_class", "normal", "--phase", "test", "--epoch", "latest"]
    )
    assert opt.ngf == 64 and opt.netG == "unet_128" and opt.lambda_L1 == 100 and opt.direction == "BtoA"
    with pytest.raises(ValueError, match="unknown netG"):
        Pix2PixModel(
            TrainOptions().parse([*ARGS, "--netG", "resnet_9blocks", "--checkpoints_dir", str(tmp_path)])
        )


def test_validation_leaves_out_a_coronal_slices_padding_columns(tmp_path):
    """A prediction right on every data column and wrong only on the padding scores as perfect
    (README: masked-region SSIM/PSNR, coronal: the data columns only), as HealthiVert's does."""
    opt = TrainOptions().parse([*ARGS, "--checkpoints_dir", str(tmp_path)])
    model = Pix2PixModel(opt)
    batch = default_collate([synthetic_sample(i, 32) for i in range(2)])
    batch["col_start"], batch["col_stop"] = torch.tensor([[8], [6]]), torch.tensor([[24], [26]])
    model.set_input(batch)
    cols = torch.arange(32).reshape(1, 1, 1, -1)
    data = (cols >= batch["col_start"].reshape(-1, 1, 1, 1)) & (cols < batch["col_stop"].reshape(-1, 1, 1, 1))
    model.fake_B = torch.where(data, model.real_B, torch.ones_like(model.real_B))
    metrics = model.validation_metrics()
    assert metrics["ssim"].tolist() == pytest.approx([1.0, 1.0])
    assert (metrics["psnr"] > 90).all()

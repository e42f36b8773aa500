"""cycle_gan: shape-consistency loss, body masks, shape-extractor training, a 3-iteration smoke run on
the shared unpaired MR/CT, and whole-volume MR-to-CT inference on the input's grid and affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from data.body_masks import body_mask, bone_mask, otsu_threshold
from models.losses.shape import shape_consistency_loss
from models.networks.resnet import ResnetGenerator
from models.networks.shape_extractor import ShapeExtractor
from tests.conftest import shared

TINY = ["--crop_size", "32", "--ngf", "8", "--ndf", "8", "--netG", "resnet_6blocks", "--spacing_mm", "6"]
TINY += ["--num_threads", "0"]


def test_shape_consistency_zero_for_identical_shapes():
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    soft = torch.rand(2, 2, 16, 16, generator=g)
    assert shape_consistency_loss(binary, binary).item() == pytest.approx(0.0, abs=1e-6)
    assert shape_consistency_loss(soft, soft).item() == pytest.approx(0.0, abs=1e-6)
    assert shape_consistency_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 0.0
    assert shape_consistency_loss(binary, 1 - binary).item() == pytest.approx(1.0, abs=1e-6)


def test_body_and_bone_masks_fill_holes():
    ct = np.full((12, 40, 40), -1000.0, np.float32)
    yy, xx = np.mgrid[:40, :40]
    body = (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2
    ct[:, body] = 40.0
    ct[:, (yy - 20) ** 2 + (xx - 14) ** 2 < 4**2] = -900.0  # a lung-like hole inside the body
    bone_ring = ((yy - 22) ** 2 + (xx - 26) ** 2 < 4**2) & ((yy - 22) ** 2 + (xx - 26) ** 2 >= 2**2)
    ct[:, bone_ring] = 700.0
    mask = body_mask(ct, "ct")
    assert mask[:, body].all() and not mask[:, ~body].any()
    bone = bone_mask(ct)
    assert bone[6, 22, 26] and bone[:, bone_ring].all() and bone.sum() < mask.sum() / 5
    mr = np.where(mask, 300.0, 5.0) + np.random.default_rng(0).normal(0, 2, ct.shape)
    assert 5 < otsu_threshold(mr) < 300
    assert (body_mask(mr, "mr") == mask).mean() > 0.99


def test_generator_and_extractor_shapes():
    x = torch.randn(2, 1, 32, 48)
    assert ResnetGenerator(1, 1, ngf=4, n_blocks=2)(x).shape == x.shape
    assert ShapeExtractor(1, 2, nf=4)(x).shape == (2, 2, 32, 48)


@pytest.fixture(scope="module")
def unpaired_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cg")
    for side, name in (("trainA", "mr.nii.gz"), ("trainB", "ct.nii.gz")):
        (root / side).mkdir()
        (root / side / name).symlink_to(shared(f"real/unpaired_mr_ct/{name}"))
    return root


def _train_argv(root: Path, ckpt: Path, name: str, *extra: str) -> list[str]:
    argv = ["--model", "cycle_gan", "--dataset_mode", "unaligned", "--dataroot", str(root), "--name", name]
    argv += ["--checkpoints_dir", str(ckpt), "--n_epochs", "1", "--n_epochs_decay", "0", "--batch_size", "1"]
    return argv + ["--max_dataset_size", "3", "--display_id", "0", "--print_freq", "1", *TINY, *extra]


def test_smoke_train_then_whole_volume_inference(unpaired_root, tmp_path):
    import predict_volume
    import train

    ckpt = tmp_path / "C"
    argv = _train_argv(
        unpaired_root, ckpt, "cg", "--lambda_cc", "1.0", "--cc_window", "5", "--shape_discriminator"
    )
    assert train.main(argv) == 0  # 3 iterations, shape extractor trained jointly
    for net in ("G_A", "G_B", "D_A", "D_B", "S", "D_S"):
        assert (ckpt / "cg" / f"latest_net_{net}.pth").is_file()
    log = (ckpt / "cg" / "loss_log.txt").read_text()
    assert "cc_A" in log and "S_seg" in log and "D_S" in log
    mr = unpaired_root / "trainA" / "mr.nii.gz"
    out = tmp_path / "pred"
    assert (
        predict_volume.main(
            ["--checkpoints_dir", str(ckpt), "--name", "cg", "--input", str(mr.parent)] + ["--out", str(out)]
        )
        == 0
    )
    result, source = nib.load(str(out / "mr_synthct.nii.gz")), nib.load(str(mr))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)


@pytest.mark.slow
def test_pretrained_shape_extractor_is_loaded_and_frozen(unpaired_root, tmp_path):
    import train
    import train_shape_extractor
    from util.checkpoint import load_checkpoint

    extractor = tmp_path / "se.pth"
    args = ["--dataroot", str(unpaired_root), "--out", str(extractor), "--iters", "2", "--crop_size", "32"]
    assert train_shape_extractor.main(args + ["--spacing_mm", "6", "--batch_size", "2", "--nf", "4"]) == 0
    ckpt = tmp_path / "C"
    argv = _train_argv(
        unpaired_root, ckpt, "cgs", "--shape_discriminator", "--shape_extractor", str(extractor)
    )
    assert train.main(argv) == 0
    saved = load_checkpoint(ckpt / "cgs" / "latest_net_S.pth")
    before = load_checkpoint(extractor)["state_dict"]
    assert all(torch.equal(saved[k], before[k]) for k in before)
    assert (
        train.main(
            _train_argv(
                unpaired_root,
                ckpt,
                "bad",
                "--shape_discriminator",
                "--shape_extractor",
                str(tmp_path / "no.pth"),
            )
        )
        == 2
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_cuda_step_under_bf16_autocast(unpaired_root, tmp_path):
    import train

    argv = _train_argv(unpaired_root, tmp_path / "C", "cg_gpu", "--lambda_cc", "1", "--shape_discriminator")
    assert train.main([*argv, "--gpu_ids", "0"]) == 0


def test_masks_become_shape_targets(unpaired_root, tmp_path):
    import argparse

    from data.unaligned_dataset import UnalignedDataset
    from util.errors import InputError

    root = tmp_path / "U"
    for side, name, seg in (("A", "mr", "mr_seg_totalseg_mr_ids"), ("B", "ct", "ct_seg_totalseg_ids")):
        for folder, src in ((f"train{side}", name), (f"mask{side}", seg)):
            (root / folder).mkdir(parents=True)
            (root / folder / f"{name}.nii.gz").symlink_to(shared(f"real/unpaired_mr_ct/{src}.nii.gz"))
    opt = argparse.Namespace(
        dataroot=str(root),
        phase="train",
        crop_size=32,
        spacing_mm=6.0,
        slice_axis=0,
        hu_min=-1024.0,
        hu_max=2048.0,
        shape_source="auto",
        modality_A="mr",
        modality_B="ct",
        no_flip=True,
        serial_batches=True,
    )
    dataset = UnalignedDataset(opt)
    shapes = np.stack([s for _, s, _, _ in dataset.domains["A"]])
    assert set(np.unique(shapes)) <= {0.0, 1.0} and 0.01 <= shapes.mean() < 0.7  # organs, not the whole body
    (root / "maskB" / "ct.nii.gz").unlink()
    with pytest.raises(InputError, match="mask for ct.nii.gz missing"):
        UnalignedDataset(opt)

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


def _unit_model(tmp_path: Path, *extra: str):
    """A tiny cycle_gan with the shape discriminator, built without a dataset, seeded."""
    from models import create_model
    from options.train_options import TrainOptions

    argv = ["--model", "cycle_gan", "--dataroot", str(tmp_path), "--name", "u", "--gpu_ids", "-1"]
    argv += ["--checkpoints_dir", str(tmp_path / "C"), *TINY, "--shape_discriminator", *extra]
    torch.manual_seed(0)
    model = create_model(TrainOptions().parse(argv))
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(1, 1, 32, 32, generator=g) * 2 - 1 for k in ("A", "B")}
    batch |= {k: (torch.rand(1, 1, 32, 32, generator=g) > 0.5).float() for k in ("shape_A", "shape_B")}
    model.set_input(batch)
    return model


def test_shape_discriminator_trains_with_its_weight(tmp_path):
    """D_S's gradient scales with --lambda_shape_gan (only its logged loss used to)."""
    norms = {}
    for weight in ("1.0", "0.01"):
        model = _unit_model(tmp_path / weight, "--lambda_shape_gan", weight)
        model.optimizer_D.step = lambda: None  # keep the gradients of the step for inspection
        model.optimize_parameters()
        norms[weight] = torch.sqrt(sum((p.grad**2).sum() for p in model.netD_S.parameters()))
    assert float(norms["0.01"] / norms["1.0"]) == pytest.approx(0.01, rel=1e-4)


def test_wgangp_adds_the_gradient_penalty_to_every_discriminator(tmp_path, monkeypatch):
    import models.cycle_gan_model as cg

    calls = []

    def penalty(netD, real, fake):
        calls.append(netD)
        return torch.zeros((), requires_grad=True)

    monkeypatch.setattr(cg, "gradient_penalty", penalty)
    model = _unit_model(tmp_path / "w", "--gan_mode", "wgangp")
    model.optimize_parameters()
    assert calls == [model.netD_A, model.netD_B, model.netD_S]
    calls.clear()
    _unit_model(tmp_path / "l").optimize_parameters()  # lsgan (the default): no penalty
    assert calls == []


def test_joint_shape_extractor_is_trainable_for_torchrun_and_a_loaded_one_frozen(tmp_path):
    """setup() wraps only trainable networks for torchrun: a jointly trained S must be one."""
    from models.cycle_gan_model import load_shape_extractor
    from util.checkpoint import save_checkpoint
    from util.errors import InputError

    assert all(p.requires_grad for p in _unit_model(tmp_path / "j").netS.parameters())
    good = tmp_path / "se.pth"
    net = ShapeExtractor(1, 1, nf=4)
    save_checkpoint({"config": {"input_nc": 1, "n_shapes": 1, "nf": 4}, "state_dict": net.state_dict()}, good)
    loaded = _unit_model(tmp_path / "l", "--shape_extractor", str(good))
    assert not any(p.requires_grad for p in loaded.netS.parameters())
    bad = tmp_path / "bad.pth"
    save_checkpoint({"config": {"input_nc": 1, "n_shapes": 1, "nf": 8}, "state_dict": net.state_dict()}, bad)
    with pytest.raises(InputError, match=r"bad.pth: its weights do not fit its config: .* of another shape"):
        load_shape_extractor(str(bad), torch.device("cpu"))
    odd = tmp_path / "odd.pth"
    save_checkpoint({"config": {"colour": 3}, "state_dict": net.state_dict()}, odd)
    with pytest.raises(InputError, match="odd.pth: its config does not build a shape extractor"):
        load_shape_extractor(str(odd), torch.device("cpu"))

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
from tests.conftest import shared, use_cuda_precision_on_cpu
from util.checkpoint import load_checkpoint, save_checkpoint
from util.errors import InputError

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


def test_body_masks_refuse_to_write_over_their_input(tmp_path, capsys):
    from data import body_masks

    ct = np.full((8, 24, 24), -1000.0, np.float32)
    ct[:, 4:20, 4:20] = 40.0
    for name in ("a.nii.gz", "b.nii.gz"):
        nib.save(nib.Nifti1Image(ct, np.eye(4)), str(tmp_path / name))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for src in (tmp_path, tmp_path / "b.nii.gz"):
        for out in (tmp_path, tmp_path / "." / ".." / tmp_path.name):
            capsys.readouterr()
            argv = ["--input", str(src), "--out", str(out), "--modality", "ct", "--overwrite"]
            assert body_masks.main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and "over its input" in err[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert (
        body_masks.main(["--input", str(tmp_path), "--out", str(tmp_path / "masks"), "--modality", "ct"]) == 0
    )
    mask = np.asanyarray(nib.load(str(tmp_path / "masks" / "a.nii.gz")).dataobj)
    assert mask.dtype == np.uint8 and mask[:, 10, 10].all() and not mask[:, 0, 0].any()


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
    assert load_checkpoint(extractor)["trained_on"] == {"spacing_mm": 6.0, "slice_axis": 0, "crop_size": 32}
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


def test_mixed_precision_path_on_cpu(unpaired_root, tmp_path, monkeypatch):
    """The CUDA path (bf16 autocast, channels_last) trains on the CPU, correlation loss and shape
    discriminator included: no dtype mix-up."""
    import train

    entered = use_cuda_precision_on_cpu(monkeypatch)
    argv = _train_argv(unpaired_root, tmp_path / "C", "cg_amp", "--lambda_cc", "1", "--shape_discriminator")
    assert train.main(argv) == 0
    log = (tmp_path / "C" / "cg_amp" / "loss_log.txt").read_text()
    assert "nan" not in log.lower() and "inf" not in log.lower()
    assert "CycleGanModel" in entered  # the bf16 path ran


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


def _cycle_gan_opt(**overrides):
    import argparse

    opt = dict(model="cycle_gan", spacing_mm=1.0, slice_axis=0, modality_A="mr", modality_B="ct")
    return argparse.Namespace(**{**opt, "hu_min": -1000, "hu_max": 1000, **overrides})


def test_volume_inference_pads_to_the_generators_multiple(tmp_path):
    import types

    from models.networks.resnet import define_G
    from predict_volume import predict_file, stride_multiple

    torch.manual_seed(0)
    unet = define_G(1, 1, 4, "unet", "instance", False, 64).eval()  # cycle_gan --netG unet --crop_size 64
    assert unet.num_downs == 6 and stride_multiple(unet) == 64
    assert stride_multiple(ResnetGenerator(1, 1, ngf=4, n_blocks=1)) == 4
    mr = tmp_path / "mr.nii.gz"
    volume = np.random.default_rng(0).random((6, 68, 70)).astype(np.float32) * 500
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(mr))
    model = types.SimpleNamespace(netG_A=unet, device=torch.device("cpu"))
    array, affine = predict_file(model, _cycle_gan_opt(), mr, 4)
    assert array.shape == volume.shape and array.dtype == np.int16
    np.testing.assert_allclose(affine, np.eye(4))


class _Constant(torch.nn.Module):
    """A "generator" whose output is ``value`` everywhere (in [-1, 1])."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x[:, :1], self.value)


def test_a_constant_prediction_is_constant_on_the_input_grid(tmp_path):
    import types

    from predict_volume import predict_file

    # 1 mm voxels worked at 1.5 mm: 101 slices become 67 whose last centre is 1 mm short of the input's
    mr = tmp_path / "mr.nii.gz"
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [30.0, -12.0, 7.0]
    nib.save(nib.Nifti1Image(np.ones((22, 19, 101), np.float32), affine), str(mr))
    model = types.SimpleNamespace(netG_A=_Constant(0.1), device=torch.device("cpu"))
    array, _ = predict_file(model, _cycle_gan_opt(spacing_mm=1.5), mr, 8)
    assert array.shape == (22, 19, 101)
    np.testing.assert_array_equal(array, 100)  # 0.1 in [-1, 1] is 100 HU in [-1000, 1000]


@pytest.mark.parametrize("value", ["0", "-1"])
def test_batch_slices_below_one_is_refused(tmp_path, capsys, value):
    import predict_volume

    out = tmp_path / "pred"
    args = ["--checkpoints_dir", str(tmp_path), "--name", "cg", "--input", str(tmp_path), "--out", str(out)]
    assert predict_volume.main([*args, "--batch_slices", value]) == 2
    assert capsys.readouterr().err == f"error: --batch_slices must be >= 1, got {value}\n"
    assert not out.exists()
    with pytest.raises(ValueError, match="batch_slices"):
        predict_volume.translate_slices(
            _Constant(0.0), np.zeros((3, 1, 4, 4), np.float32), 0, torch.device("cpu")
        )


POOL_TINY = ["--crop_size", "32", "--ngf", "4", "--ndf", "4", "--netG", "resnet_1blocks"]
POOL_TINY += ["--num_threads", "0"]


def _unpaired_root(root: Path) -> Path:
    """4 slices of 32 x 32 per domain, with masks (every slice has a shape)."""
    rng = np.random.default_rng(0)
    for side, scale in (("A", 500.0), ("B", 1000.0)):
        for folder in (f"train{side}", f"mask{side}"):
            (root / folder).mkdir(parents=True)
        volume = (rng.random((4, 32, 32)) * scale).astype(np.float32)
        mask = np.zeros((4, 32, 32), np.uint8)
        mask[:, 8:24, 8:24] = 1
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / f"train{side}" / "v.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(root / f"mask{side}" / "v.nii.gz"))
    return root


def _cycle_args(root: Path, ckpt: Path, name: str, *extra: str) -> list[str]:
    argv = ["--model", "cycle_gan", "--dataset_mode", "unaligned", "--dataroot", str(root), "--name", name]
    argv += ["--checkpoints_dir", str(ckpt), "--n_epochs", "2", "--n_epochs_decay", "0", "--batch_size", "1"]
    argv += ["--display_id", "0", "--print_freq", "1000", "--spacing_mm", "1", "--gpu_ids", "-1"]
    return argv + ["--save_epoch_freq", "1", *POOL_TINY, *extra]


def test_cycle_gan_resume_is_exact_with_a_full_image_pool(tmp_path):
    """--continue_train lands on the weights of a straight run: the image pools are train state.
    With a pool of 1 image (full after the first iteration) a resumed run's discriminators used to
    see an empty pool, and G_A drifted from the straight run's by up to 2.6e-3 after 4 steps."""
    import train

    root, ckpt = _unpaired_root(tmp_path / "U"), tmp_path / "C"
    assert train.main(_cycle_args(root, ckpt, "run", "--pool_size", "1")) == 0
    resumed = ckpt / "resumed"
    resumed.mkdir()
    for path in (ckpt / "run").glob("1_*.pth"):  # every file of the epoch-1 save
        (resumed / path.name).write_bytes(path.read_bytes())
    resume = ["--pool_size", "1", "--continue_train", "--epoch", "1"]
    assert train.main(_cycle_args(root, ckpt, "resumed", *resume)) == 0
    for net in ("G_A", "G_B", "D_A", "D_B"):
        a = load_checkpoint(ckpt / "run" / f"latest_net_{net}.pth")
        b = load_checkpoint(resumed / f"latest_net_{net}.pth")
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert worst == 0.0, (net, worst)


def test_image_pool_state_round_trip():
    from util.image_pool import ImagePool

    pool = ImagePool(2)
    pool.query(torch.arange(2.0).view(2, 1, 1, 1))
    again = ImagePool(2)
    again.load_state_dict(pool.state_dict())
    assert [float(x) for x in again.images] == [0.0, 1.0]
    small = ImagePool(1)
    small.load_state_dict(pool.state_dict())
    assert len(small.images) == 1


def test_a_shape_extractor_with_other_input_channels_is_refused_by_name(tmp_path):
    """A --shape_extractor trained on 3-channel images used to load, then fail at the first
    iteration with a convolution error that names no file."""
    from models import create_model
    from models.networks.shape_extractor import ShapeExtractor
    from options.train_options import TrainOptions

    net = ShapeExtractor(3, 1, nf=4)
    path = tmp_path / "se3.pth"
    save_checkpoint({"config": net.config(), "state_dict": net.state_dict()}, path)
    argv = ["--model", "cycle_gan", "--dataroot", str(tmp_path), "--name", "u", "--gpu_ids", "-1"]
    argv += ["--checkpoints_dir", str(tmp_path / "C"), *POOL_TINY, "--shape_discriminator"]
    with pytest.raises(InputError, match=r"se3.pth: the shape extractor takes 3-channel images"):
        create_model(TrainOptions().parse([*argv, "--shape_extractor", str(path)]))
    good = tmp_path / "se1.pth"
    net = ShapeExtractor(1, 1, nf=4)
    save_checkpoint({"config": net.config(), "state_dict": net.state_dict()}, good)
    model = create_model(TrainOptions().parse([*argv, "--shape_extractor", str(good)]))
    assert model.netS.input_nc == 1


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--crop_size", "30"), "--crop_size must be divisible by 4"),
        (
            ("--lambda_cc", "1", "--cc_window", "64"),
            "--cc_window must be 0 (global only) or in [2, --crop_size",
        ),
    ],
)
def test_sizes_the_networks_cannot_take_are_refused_before_the_run_starts(
    unpaired_root, tmp_path, capsys, extra, said
):
    import train

    assert train.main(_train_argv(unpaired_root, tmp_path, "bad", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and said in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_a_run_trained_b_to_a_predicts_with_the_generator_from_domain_a():
    import types

    from predict_volume import domain_a_to_b

    model = types.SimpleNamespace(netG_A="G_A", netG_B="G_B")
    assert domain_a_to_b(model, _cycle_gan_opt()) == "G_A"
    assert domain_a_to_b(model, _cycle_gan_opt(direction="AtoB")) == "G_A"
    assert domain_a_to_b(model, _cycle_gan_opt(direction="BtoA")) == "G_B"


def test_a_shape_extractor_of_other_slices_is_named():
    from models.cycle_gan_model import slice_differences

    opt = _cycle_gan_opt(spacing_mm=2.0, slice_axis=0, crop_size=64)
    assert slice_differences({"spacing_mm": 2.0, "slice_axis": 0, "crop_size": 128}, opt) == []
    assert slice_differences({"spacing_mm": 1.0, "slice_axis": 2}, opt) == [
        "--spacing_mm 1 there, 2 here",
        "--slice_axis 2 there, 0 here",
    ]
    assert slice_differences(None, opt) == []  # saved before extractors recorded their slices

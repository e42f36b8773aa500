"""mask2ct: label subset, aligned augmentation, a 3-iteration smoke run on the shared heart CT, and
whole-volume inference on the mask's grid and affine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.mask2ct_dataset import Mask2ctDataset, augment_pair, one_hot_labels, parse_labels
from tests.conftest import shared, use_cuda_precision_on_cpu
from util.errors import InputError

TINY = ["--crop_size", "32", "--ngf", "8", "--ndf", "8", "--spacing_mm", "6", "--num_threads", "0"]


def test_label_subset_maps_as_documented(tmp_path):
    labels = np.array([[0, 1, 2, 3]])
    with_bg = one_hot_labels(labels, [0, 1, 3])
    assert with_bg.shape == (3, 1, 4)
    np.testing.assert_array_equal(with_bg[:, 0], [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    without_bg = one_hot_labels(labels, [3, 1])  # order of the list is the channel order
    np.testing.assert_array_equal(without_bg[:, 0], [[0, 0, 0, 1], [0, 1, 0, 0]])
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"LABELS": [0, 1, 3]}))
    assert parse_labels(None, config) == [0, 1, 3]
    assert parse_labels("0,2", None) == [0, 2]
    for bad in ("0,a", "1,1", None):
        with pytest.raises(InputError):
            parse_labels(bad, None)
    with pytest.raises(InputError, match="not both"):  # the config used to win silently
        parse_labels("0,2", config)


def test_augmentation_keeps_mask_and_image_aligned():
    labels = np.zeros((48, 48), np.int16)
    labels[10:30, 15:40] = 2
    image = np.where(labels > 0, 0.8, -0.8).astype(np.float32)
    rng = np.random.default_rng(3)
    for _ in range(5):
        lab, img = augment_pair(labels, image, rng, intensity=0.0)
        inside = lab > 0
        assert inside.sum() > 300
        assert (img[inside] > 0).mean() > 0.95 and (img[~inside] < 0).mean() > 0.95


@pytest.fixture(scope="module")
def heart_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("m2c")
    case = root / "raw" / "heart"
    case.mkdir(parents=True)
    (case / "heart.nii.gz").symlink_to(shared("real/chest_heart_ct/ct.nii.gz"))
    (case / "heart_msk.nii.gz").symlink_to(shared("real/chest_heart_ct/msk_heart1_aorta2_pulmonary3.nii.gz"))
    return root


def test_held_out_slices_are_not_training_slices(heart_root):
    opt = argparse.Namespace(
        dataroot=str(heart_root),
        labels="0,1,2,3",
        config=None,
        phase="train",
        no_augment=False,
        crop_size=32,
        spacing_mm=6.0,
        slice_axis=0,
        hu_min=-1024.0,
        hu_max=2048.0,
        holdout_fraction=0.25,
        holdout_gap_mm=15.0,
        intensity_aug=0.03,
    )
    train = Mask2ctDataset(opt)
    held = Mask2ctDataset(argparse.Namespace(**{**vars(opt), "phase": "val"}))
    assert len(held) > 0 and not {s for _, s in train.slices} & {s for _, s in held.slices}
    gap = min(h for _, h in held.slices) - max(t for _, t in train.slices)
    assert gap * opt.spacing_mm > 15.0  # --holdout_gap_mm: no near-copy of a held-out slice in training
    item = train[0]
    assert item["A"].shape == (4, 32, 32) and item["B"].shape == (1, 32, 32)
    assert float(item["A"].sum(0).min()) == 1.0  # one-hot: every pixel in exactly one channel


def test_smoke_train_then_whole_volume_inference(heart_root, tmp_path):
    import predict_volume
    import train

    ckpt = tmp_path / "C"
    argv = [
        "--model",
        "mask2ct",
        "--dataset_mode",
        "mask2ct",
        "--dataroot",
        str(heart_root),
        "--labels",
        "0,1,2,3",
    ]
    argv += ["--name", "m2c", "--checkpoints_dir", str(ckpt), "--n_epochs", "1", "--n_epochs_decay", "0"]
    argv += ["--batch_size", "2", "--max_dataset_size", "6", "--display_id", "0", "--print_freq", "2", *TINY]
    assert train.main(argv) == 0  # 3 iterations
    for name in ("latest_net_G.pth", "latest_net_D.pth", "opt.json"):
        assert (ckpt / "m2c" / name).is_file()
    mask = heart_root / "raw" / "heart" / "heart_msk.nii.gz"
    out = tmp_path / "pred"
    args = ["--checkpoints_dir", str(ckpt), "--name", "m2c", "--input", str(mask), "--out", str(out)]
    assert predict_volume.main(args) == 0
    result, source = nib.load(str(out / "heart_msk_synthct.nii.gz")), nib.load(str(mask))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-4)
    hu = np.asanyarray(result.dataobj)
    assert hu.dtype == np.int16 and -1024 <= hu.min() and hu.max() <= 2048
    assert predict_volume.main(args) == 0  # rerun skips the finished output
    assert predict_volume.main([*args[:5], str(tmp_path / "missing.nii.gz"), *args[6:]]) == 2


def test_mixed_precision_path_on_cpu(heart_root, tmp_path, monkeypatch):
    """The CUDA path (bf16 autocast, channels_last) trains on the CPU: no dtype mix-up."""
    import train

    entered = use_cuda_precision_on_cpu(monkeypatch)
    argv = ["--model", "mask2ct", "--dataroot", str(heart_root), "--labels", "0,1", "--name", "g"]
    argv += ["--checkpoints_dir", str(tmp_path), "--n_epochs", "1", "--n_epochs_decay", "0"]
    argv += ["--batch_size", "2", "--display_id", "0"]
    assert train.main([*argv, "--max_dataset_size", "4", *TINY]) == 0
    log = (tmp_path / "g" / "loss_log.txt").read_text()
    assert "nan" not in log.lower() and "inf" not in log.lower()
    assert "Mask2ctModel" in entered  # the bf16 path ran


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_smoke(heart_root, tmp_path):
    import train

    argv = ["--model", "mask2ct", "--dataroot", str(heart_root), "--labels", "0,1", "--name", "g"]
    argv += ["--checkpoints_dir", str(tmp_path), "--n_epochs", "1", "--n_epochs_decay", "0"]
    argv += ["--batch_size", "2"]
    assert train.main([*argv, "--max_dataset_size", "4", "--gpu_ids", "0", *TINY]) == 0


@pytest.mark.parametrize("label", [32768, 40000, 65536, 2**24 + 1])
def test_label_ids_beyond_int16_survive_loading(tmp_path, label):
    """load_labels cast ids to int16: 40000 became -25536 and 65536 became 0 (background), so the
    label's mask2ct channel was empty and the unaligned shape target lost it; 2**24 + 1 went through
    float32 and became 2**24 (then 0)."""
    from data.mask2ct_dataset import load_labels
    from data.unaligned_dataset import load_domain_volume

    labels = np.zeros((32, 32, 6), np.int64)  # RAS: every axial slice (fixed axis 2) is the same
    labels[10:20, 10:20] = label
    labels[22:26, 5:9] = 3
    dtype = np.uint16 if label < 2**16 else np.int32
    mask = tmp_path / "raw" / "c" / "c_msk.nii.gz"
    mask.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(labels.astype(dtype), np.eye(4)), str(mask))
    ct = np.where(labels > 0, 200.0, -800.0).astype(np.float32)
    nib.save(nib.Nifti1Image(ct, np.eye(4)), str(mask.parent / "c.nii.gz"))

    assert set(np.unique(load_labels(mask).array).tolist()) == {0, 3, label}
    opt = argparse.Namespace(
        dataroot=str(tmp_path), labels=f"0,{label},3", config=None, phase="val", crop_size=32,
        spacing_mm=1.0, slice_axis=0, hu_min=-1024.0, hu_max=2048.0, holdout_fraction=0.5,
        holdout_gap_mm=0.0, no_augment=True, intensity_aug=0.0,
    )  # fmt: skip
    item = Mask2ctDataset(opt)[0]
    assert item["A"].shape == (3, 32, 32)
    assert int(item["A"][1].sum()) == 100 and int(item["A"][2].sum()) == 16
    _, shape = load_domain_volume(mask.parent / "c.nii.gz", "ct", 1.0, (-1024.0, 2048.0), mask)
    assert int(shape.sum()) == 6 * (100 + 16)


def test_a_run_keeps_its_labels_and_its_test_page_shows_every_held_out_slice(heart_root, tmp_path, capsys):
    """Trained from a --config file: opt.json records the label subset itself (test.py and
    predict_volume.py re-read the file from wherever they ran, and an edited file swapped the
    channels); test.py tests one slice per sample, each under its own image names, however many
    samples the training run was capped at."""
    import predict_volume
    import test as test_script
    import train

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"LABELS": [0, 1, 2, 3]}))
    ckpt = tmp_path / "C"
    argv = ["--model", "mask2ct", "--dataroot", str(heart_root), "--config", str(cfg), "--name", "m2c"]
    argv += ["--checkpoints_dir", str(ckpt), "--n_epochs", "1", "--n_epochs_decay", "0", "--batch_size", "2"]
    argv += ["--max_dataset_size", "2", "--display_id", "0", *TINY]
    assert train.main(argv) == 0
    saved = json.loads((ckpt / "m2c" / "opt.json").read_text())
    assert saved["labels"] == "0,1,2,3" and saved["config"] is None
    cfg.write_text(json.dumps({"LABELS": [0, 3, 2, 1]}))  # edited after training: not what the run learnt
    results = tmp_path / "R"
    args = ["--dataroot", str(heart_root), "--name", "m2c", "--checkpoints_dir", str(ckpt)]
    assert test_script.main([*args, "--results_dir", str(results), "--phase", "test", "--num_test", "3"]) == 0
    assert "tested 3 samples" in capsys.readouterr().out
    fakes = sorted(p.name for p in results.rglob("*_fake_B.png"))
    assert len(fakes) == 3 and all("_slice" in name for name in fakes), fakes
    page = next(results.rglob("index.html")).read_text()
    assert all(name in page for name in fakes)
    # predict_volume: --out must be a folder other than the input folder
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "heart_msk.nii.gz").symlink_to(heart_root / "raw" / "heart" / "heart_msk.nii.gz")
    pred = ["--checkpoints_dir", str(ckpt), "--name", "m2c", "--input", str(masks)]
    assert predict_volume.main([*pred, "--out", str(masks)]) == 2
    assert "--out must not be the input folder" in capsys.readouterr().err
    assert predict_volume.main([*pred, "--out", str(cfg)]) == 2
    assert "--out must be a folder" in capsys.readouterr().err
    assert sorted(p.name for p in masks.iterdir()) == ["heart_msk.nii.gz"]


def test_flags_mask2ct_cannot_honour_are_refused_or_honoured(heart_root, tmp_path, capsys):
    import train

    argv = ["--model", "mask2ct", "--dataroot", str(heart_root), "--labels", "0,1", "--name", "m"]
    argv += [
        "--checkpoints_dir",
        str(tmp_path),
        "--display_id",
        "0",
        "--n_epochs",
        "1",
        "--n_epochs_decay",
        "0",
    ]
    argv += ["--max_dataset_size", "2", *TINY]
    assert train.main([*argv, "--netG", "resnet_9blocks"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "U-Net generator" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
    labels = np.zeros((48, 48), np.int16)
    labels[5:20, 3:12] = 1  # off-centre: a flip moves it
    image = np.where(labels > 0, 0.8, -0.8).astype(np.float32)
    rng = np.random.default_rng(0)
    kept = [
        np.array_equal(
            augment_pair(labels, image, rng, max_rot_deg=0, max_scale=0, max_shift=0, flip=False)[0], labels
        )
        for _ in range(20)
    ]
    assert all(kept)


def test_dropout_samples_follow_the_seed_volume_by_volume(tmp_path, monkeypatch):
    """--dropout_noise draws a sample: --seed picks it, and each volume's draw starts from the seed
    (the same volume gives the same sample alone or after others)."""
    import types

    import torch

    import predict_volume

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a_msk.nii.gz", "b_msk.nii.gz"):
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), str(src / name))
    model = types.SimpleNamespace(networks=lambda: {})
    monkeypatch.setattr(predict_volume, "load_model", lambda *a: (model, argparse.Namespace(model="mask2ct")))
    monkeypatch.setattr(
        predict_volume, "predict_file", lambda *a: (torch.rand(2, 2, 2).numpy().astype(np.float32), np.eye(4))
    )

    def sample(seed: int, what=src) -> dict:
        out = tmp_path / f"out{seed}_{Path(what).name}"
        args = ["--checkpoints_dir", "C", "--name", "m", "--input", str(what), "--out", str(out)]
        assert predict_volume.main([*args, "--dropout_noise", "--seed", str(seed)]) == 0
        return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in out.iterdir()}

    first, again, other = sample(1), sample(1, src / "b_msk.nii.gz"), sample(2)
    np.testing.assert_array_equal(first["b_msk_synthct.nii.gz"], again["b_msk_synthct.nii.gz"])
    assert not np.array_equal(first["a_msk_synthct.nii.gz"], other["a_msk_synthct.nii.gz"])

"""Benchmark and closing figures of issue 11 (prints figures; not a test).

    python -m benchmarks.bench_issue11 [--iters 200] [--repeats 1] [--device auto] [--work DIR]

- mask2ct on ``real/chest_heart_ct`` (labels 0,1,2,3): trains ``--iters`` iterations, then the MAE in
  HU inside the labelled region (heart, aorta, pulmonary artery) of the held-out slices (the last 20 %
  of labelled axial slices, never seen in training), next to the MAE of a trivial baseline that
  paints each label with its mean training HU.
- cycle_gan on ``real/unpaired_mr_ct``: trains with ``--lambda_cc 0`` and ``--lambda_cc 1``, then the
  mean per-slice Pearson r between the input MR and the output CT (inside the MR body mask).
- iterations per second (median over the timed iterations, the first 3 left out as warm-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import create_dataset  # noqa: E402
from data.body_masks import body_mask  # noqa: E402
from data.intensity import unit_to_ct  # noqa: E402
from data.mask2ct_dataset import Mask2ctDataset, load_pair, one_hot_labels  # noqa: E402
from data.unaligned_dataset import load_domain_volume  # noqa: E402
from models import create_model  # noqa: E402
from options.base_options import setup  # noqa: E402
from options.train_options import TrainOptions  # noqa: E402

SHARED = Path(
    os.environ.get("HEALTHIVERT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def masked_mae_hu(pred_hu: np.ndarray, real_hu: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute error in HU inside ``mask``."""
    return float(np.abs(pred_hu[mask] - real_hu[mask]).mean())


def masked_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson r of two images inside ``mask`` (nan when fewer than 10 voxels)."""
    if mask.sum() < 10:
        return float("nan")
    return float(np.corrcoef(a[mask].ravel(), b[mask].ravel())[0, 1])


def train_timed(argv: list[str], iters: int) -> tuple[object, argparse.Namespace, list[float]]:
    """Train ``iters`` iterations in-process; returns the model, options and per-iteration seconds."""
    options = TrainOptions()
    opt = options.parse(argv)
    setup(opt, options.parser_)
    dataset = create_dataset(opt)
    model = create_model(opt)
    model.setup(opt)
    model.train()
    times: list[float] = []
    while len(times) < iters:
        for batch in dataset:
            start = time.perf_counter()
            model.set_input(batch)
            model.optimize_parameters()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if len(times) >= iters:
                break
    return model, opt, times


def its_per_second(times: list[float], batch_size: int) -> str:
    timed = times[3:] if len(times) > 6 else times
    median = statistics.median(timed)
    return f"{1 / median:.2f} it/s ({batch_size / median:.1f} slices/s, median of {len(timed)} iterations)"


def run_net(net: torch.nn.Module, slices: np.ndarray, multiple: int, pad: float, device) -> np.ndarray:
    """Generator outputs for (N, C, H, W) slices, padded to ``multiple`` and cropped back."""
    from predict_volume import pad_slices

    h, w = slices.shape[-2:]
    batch = torch.from_numpy(np.ascontiguousarray(pad_slices(slices, multiple, pad))).to(device)
    with torch.no_grad():
        return net(batch).float()[:, 0, :h, :w].cpu().numpy()


def bench_mask2ct(work: Path, args: argparse.Namespace) -> None:
    root = work / "m2c_root"
    case = root / "raw" / "heart"
    case.mkdir(parents=True, exist_ok=True)
    for src, dst in (
        ("ct.nii.gz", "heart.nii.gz"),
        ("msk_heart1_aorta2_pulmonary3.nii.gz", "heart_msk.nii.gz"),
    ):
        if not (case / dst).exists():
            (case / dst).symlink_to(SHARED / "real" / "chest_heart_ct" / src)
    common = ["--dataroot", str(root), "--labels", "0,1,2,3", "--spacing_mm", "1.5", "--crop_size", "64"]
    common += ["--ngf", "32", "--ndf", "32", "--gpu_ids", args.gpu_ids]
    argv = [
        "--model",
        "mask2ct",
        "--dataset_mode",
        "mask2ct",
        "--name",
        "m2c",
        "--checkpoints_dir",
        str(work),
    ]
    argv += ["--batch_size", "4", "--num_threads", "0", "--display_id", "0", "--lr", "2e-4", *common]
    model, opt, times = train_timed(argv, args.iters)
    print(f"mask2ct training ({args.iters} iterations, batch 4, 64 px, ngf 32): {its_per_second(times, 4)}")
    held = Mask2ctDataset(argparse.Namespace(**{**vars(opt), "phase": "val"}))
    train_set = Mask2ctDataset(opt)
    ct_hu, labels, _ = load_pair(case / "heart.nii.gz", case / "heart_msk.nii.gz", opt.spacing_mm)
    held_idx = sorted({k for _, k in held.slices})
    train_idx = sorted({k for _, k in train_set.slices})
    model.eval()
    unit = run_net(
        model.netG,
        one_hot_labels(labels[held_idx], model.subset).swapaxes(0, 1),
        2**model.netG.num_downs,
        0.0,
        model.device,
    )
    pred = unit_to_ct(unit, opt.hu_min, opt.hu_max)
    real = ct_hu[held_idx]
    region = labels[held_idx] > 0
    baseline = np.full_like(real, float(np.median(ct_hu[train_idx][labels[train_idx] == 0])))
    for v in (1, 2, 3):
        sel = labels[train_idx] == v
        if sel.any():
            baseline[labels[held_idx] == v] = float(ct_hu[train_idx][sel].mean())
    per_label = ", ".join(
        f"label {v} {masked_mae_hu(pred, real, labels[held_idx] == v):.0f}"
        for v in (1, 2, 3)
        if (labels[held_idx] == v).any()
    )
    print(
        f"mask2ct held-out slices {held_idx[0]}-{held_idx[-1]} ({len(held_idx)} axial slices, 1.5 mm): "
        f"masked-region MAE {masked_mae_hu(pred, real, region):.1f} HU ({per_label}); "
        f"per-label-mean baseline {masked_mae_hu(baseline, real, region):.1f} HU"
    )


def bench_cycle_gan(work: Path, args: argparse.Namespace) -> None:
    root = work / "cg_root"
    for side, name in (("trainA", "mr.nii.gz"), ("trainB", "ct.nii.gz")):
        (root / side).mkdir(parents=True, exist_ok=True)
        if not (root / side / name).exists():
            (root / side / name).symlink_to(SHARED / "real" / "unpaired_mr_ct" / name)
    for lambda_cc in (0.0, 1.0):
        argv = ["--model", "cycle_gan", "--dataset_mode", "unaligned", "--dataroot", str(root)]
        argv += ["--name", f"cg_cc{lambda_cc:g}", "--checkpoints_dir", str(work), "--spacing_mm", "3"]
        argv += [
            "--crop_size",
            "64",
            "--ngf",
            "16",
            "--ndf",
            "32",
            "--netG",
            "resnet_6blocks",
            "--num_threads",
            "0",
        ]
        argv += ["--lambda_cc", str(lambda_cc), "--display_id", "0", "--gpu_ids", args.gpu_ids]
        model, opt, times = train_timed(argv, args.cycle_iters)
        dataset = model  # noqa: F841 (keep the model alive for evaluation)

        mr_unit, _ = load_domain_volume(
            root / "trainA" / "mr.nii.gz", "mr", opt.spacing_mm, (opt.hu_min, opt.hu_max), None
        )
        model.eval()
        fake = run_net(model.netG_A, mr_unit[:, None], 4, -1.0, model.device)
        body = body_mask(mr_unit, "mr")
        r = [masked_correlation(mr_unit[k], fake[k], body[k]) for k in range(len(mr_unit))]
        r = [v for v in r if np.isfinite(v)]
        print(
            f"cycle_gan --lambda_cc {lambda_cc:g} ({args.cycle_iters} iterations, 64 px, ngf 16, resnet_6): "
            f"{its_per_second(times, 1)}; r(input MR, output CT) inside the body: mean {np.mean(r):.3f}, "
            f"median {np.median(r):.3f} over {len(r)} slices"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=200, help="mask2ct training iterations")
    parser.add_argument("--cycle_iters", type=int, default=100, help="cycle_gan training iterations per run")
    parser.add_argument("--gpu_ids", default="auto")
    parser.add_argument("--work", default=None, help="keep checkpoints here (default: a temporary folder)")
    parser.add_argument("--only", choices=("mask2ct", "cycle_gan"), default=None)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    device = (
        "CUDA " + torch.cuda.get_device_name(0)
        if torch.cuda.is_available() and args.gpu_ids != "-1"
        else "CPU"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {device}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.only in (None, "mask2ct"):
            bench_mask2ct(work, args)
        if args.only in (None, "cycle_gan"):
            bench_cycle_gan(work, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

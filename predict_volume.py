"""Whole-volume inference of the 2D synthesis models, written on the input's grid and affine.

    python predict_volume.py --checkpoints_dir C --name NAME --input FILE_or_FOLDER --out DIR
                             [--epoch latest] [--batch_slices 16] [--dropout_noise] [--overwrite]

The model and its options come from ``C/NAME/opt.json``:

- ``mask2ct``: the input is a label volume (``<case>_msk.nii.gz``); the labels are reoriented and
  resampled (nearest) as in training, one-hot encoded with the trained label subset, translated
  slice by slice along the trained ``--slice_axis`` and written as CT in HU (int16).
- ``cycle_gan``: the input is an MR volume (domain A); it is normalised as in training and the
  A -> B generator (G_A; G_B for a run trained ``--direction BtoA``) translates it slice by slice
  to CT, written in HU (int16; or in [-1, 1] float if domain B is MR).

Slices are padded to the generator's stride multiple (2**num_downs for a U-Net generator, 4 for a
ResNet one) and processed ``--batch_slices`` (>= 1) at a time; the prediction is resampled (linear)
from the working grid back onto the input's grid, so the output has the input's shape and affine
(input voxels past the working grid's last voxel centre, where its rounded size falls short of the
input's extent, take that edge voxel's value). Output: ``DIR/<input stem>_synthct.nii.gz``; existing
outputs are skipped unless ``--overwrite``. A folder input processes every ``*.nii.gz`` / ``*.nii`` in it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.intensity import to_unit, unit_to_ct
from data.mask2ct_dataset import load_labels, one_hot_labels, parse_labels
from data.nifti_io import Volume, load_ct, reorient, resample, resample_to_grid, save_nifti
from models import create_model
from models.base_model import unwrap
from options.base_options import load_options
from util.errors import InputError, input_error

SUPPORTED = ("mask2ct", "cycle_gan")


def stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def pad_slices(slices: np.ndarray, multiple: int, value: float) -> np.ndarray:
    """Pad (N, ..., H, W) at the bottom/right so H and W are multiples of ``multiple``."""
    h, w = slices.shape[-2:]
    pads = [(0, 0)] * (slices.ndim - 2) + [(0, (-h) % multiple), (0, (-w) % multiple)]
    return np.pad(slices, pads, constant_values=value)


def stride_multiple(net: torch.nn.Module) -> int:
    """The side multiple the generator needs: 2**num_downs for a U-Net, 4 for the ResNet generator."""
    return 2 ** int(getattr(unwrap(net), "num_downs", 2))


def translate_slices(
    net: torch.nn.Module, slices: np.ndarray, batch_slices: int, device: torch.device
) -> np.ndarray:
    """Run ``net`` on (N, C, H, W) slices in batches of ``batch_slices``; returns (N, H, W) in [-1, 1]."""
    if batch_slices < 1:
        raise ValueError(f"batch_slices must be >= 1, got {batch_slices}")
    out = np.empty((slices.shape[0], *slices.shape[2:]), dtype=np.float32)
    with torch.no_grad():
        for start in tqdm(range(0, len(slices), batch_slices), desc="slices", leave=False):
            batch = torch.from_numpy(slices[start : start + batch_slices]).to(device)
            if device.type == "cuda":
                with torch.autocast("cuda", torch.bfloat16):
                    pred = net(batch.contiguous(memory_format=torch.channels_last))
            else:
                pred = net(batch)
            out[start : start + len(batch)] = pred.float()[:, 0].cpu().numpy()
    return out


def domain_a_to_b(model, opt: argparse.Namespace) -> torch.nn.Module:
    """The CycleGAN generator that translates the dataset's domain A (``trainA/``, ``--modality_A``)
    to domain B: G_A when trained ``--direction AtoB`` (the default), G_B when trained ``BtoA``
    (``set_input`` then swapped the domains, so G_A learned B -> A)."""
    return model.netG_B if getattr(opt, "direction", "AtoB") == "BtoA" else model.netG_A


def generator_inputs(opt: argparse.Namespace, path: Path, multiple: int) -> tuple[np.ndarray, Volume, Volume]:
    """(N, C, H', W') padded slices on the working grid, the working-grid volume and the input volume.

    mask2ct pads the labels with background before one-hot encoding; cycle_gan pads the image with -1.
    """
    if opt.model == "mask2ct":
        original = load_labels(path)
        work = resample(reorient(original), opt.spacing_mm, order=0)
        labels = pad_slices(np.moveaxis(work.array, opt.slice_axis, 0), multiple, 0)
        slices = np.moveaxis(one_hot_labels(labels, parse_labels(opt.labels, opt.config)), 0, 1)
        return np.ascontiguousarray(slices), work, original
    original = load_ct(path)
    work = resample(reorient(original), opt.spacing_mm, order=1)
    unit = np.moveaxis(to_unit(work.array, opt.modality_A, (opt.hu_min, opt.hu_max)), opt.slice_axis, 0)
    return np.ascontiguousarray(pad_slices(unit[:, None], multiple, -1.0)), work, original


def predict_file(
    model, opt: argparse.Namespace, path: Path, batch_slices: int
) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic volume (in HU when the output is CT) on ``path``'s grid, and that grid's affine."""
    net = model.netG if opt.model == "mask2ct" else domain_a_to_b(model, opt)
    slices, work, original = generator_inputs(opt, path, stride_multiple(net))
    h, w = np.delete(np.array(work.shape), opt.slice_axis)
    unit = np.moveaxis(
        translate_slices(net, slices, batch_slices, model.device)[:, :h, :w], 0, opt.slice_axis
    )
    to_ct = opt.model == "mask2ct" or getattr(opt, "modality_B", "ct") == "ct"
    values = unit_to_ct(unit, opt.hu_min, opt.hu_max) if to_ct else unit
    # the working grid covers the input's extent up to rounding: its edge voxels extend to the border
    on_input = resample_to_grid(values, work.affine, original.affine, original.shape, order=1, mode="nearest")
    return (np.rint(on_input).astype(np.int16) if to_ct else on_input.astype(np.float32)), original.affine


def load_model(checkpoints_dir: str, name: str, epoch: str, device: str):
    """The trained model from ``checkpoints_dir/name`` (its saved options), networks loaded, eval mode."""
    opt_path = Path(checkpoints_dir) / name / "opt.json"
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    opt = load_options(
        opt_path, isTrain=False, checkpoints_dir=checkpoints_dir, name=name, gpu_ids=[0] if use_cuda else []
    )
    if opt.model not in SUPPORTED:
        raise input_error(
            opt_path, f"model {opt.model!r} is not a volume-synthesis model ({' | '.join(SUPPORTED)})"
        )
    model = create_model(opt)
    model.load_networks(epoch)
    model.eval()
    return model, opt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints_dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--input", required=True, help="a NIfTI volume or a folder of them")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--epoch", default="latest")
    parser.add_argument("--batch_slices", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--dropout_noise", action="store_true", help="keep dropout on (mask2ct: diverse samples)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with --dropout_noise: the sample drawn (each volume from this seed)",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.batch_slices < 1:
        print(f"error: --batch_slices must be >= 1, got {args.batch_slices}", file=sys.stderr)
        return 2
    src = Path(args.input)
    try:
        if src.is_dir():
            files = sorted(p for p in src.iterdir() if p.name.endswith((".nii.gz", ".nii")))
            if not files:
                raise input_error(src, "no .nii.gz volumes in this folder")
        elif src.is_file():
            files = [src]
        else:
            raise input_error(src, "input not found")
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise input_error(out_dir, "--out must be a folder; this is a file")
        if src.is_dir() and out_dir.resolve() == src.resolve():
            # outputs would join the inputs: a rerun would translate them again (<stem>_synthct_synthct)
            raise input_error(out_dir, "--out must not be the input folder")
        model, opt = load_model(args.checkpoints_dir, args.name, args.epoch, args.device)
        if args.dropout_noise:
            for module in model.networks().values():
                for m in module.modules():
                    if isinstance(m, torch.nn.Dropout):
                        m.train()
        written = skipped = 0
        for path in tqdm(files, desc="volumes", disable=len(files) < 2):
            out = Path(args.out) / f"{stem(path)}_synthct.nii.gz"
            if out.exists() and not args.overwrite:
                skipped += 1
                continue
            torch.manual_seed(args.seed)  # a volume's sample does not depend on the volumes before it
            array, affine = predict_file(model, opt, path, args.batch_slices)
            save_nifti(out, array, affine, descrip=f"{opt.model} {args.name} epoch {args.epoch}")
            written += 1
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --out
        print(f"error: {args.out}: cannot write ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"{opt.model}: {written} volumes written, {skipped} skipped (exist; --overwrite) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

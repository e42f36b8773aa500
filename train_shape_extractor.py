"""Train the shape extractor of ``--model cycle_gan --shape_discriminator`` on its own.

    python train_shape_extractor.py --dataroot U --out shape_extractor.pth [--iters 2000]
                                    [--shape_source auto|masks|body] [--crop_size 128] [--spacing_mm 1.0]

It reads the same folders as ``--dataset_mode unaligned`` (``trainA/`` MR, ``trainB/`` CT, optional
``maskA/``, ``maskB/``) and learns to segment the shape targets (mask foreground, or body masks from
thresholding and hole filling when there are no masks) from slices of both modalities. The
checkpoint holds the network's config and state_dict; pass it to training as
``--shape_extractor shape_extractor.pth``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.intensity import CT_WINDOW_HU
from data.unaligned_dataset import UnalignedDataset
from models.losses.shape import shape_consistency_loss
from models.networks.shape_extractor import ShapeExtractor, segmentation_loss
from util.checkpoint import save_checkpoint, seed_everything
from util.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--out", required=True, help="checkpoint to write (.pth)")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--crop_size", type=int, default=128)
    parser.add_argument("--spacing_mm", type=float, default=1.0)
    parser.add_argument("--slice_axis", type=int, default=0, choices=(0, 1, 2))
    parser.add_argument("--shape_source", default="auto", choices=("auto", "masks", "body"))
    parser.add_argument("--modality_A", default="mr", choices=("mr", "ct"))
    parser.add_argument("--modality_B", default="ct", choices=("mr", "ct"))
    parser.add_argument("--hu_min", type=float, default=CT_WINDOW_HU[0])
    parser.add_argument("--hu_max", type=float, default=CT_WINDOW_HU[1])
    parser.add_argument("--nf", type=int, default=16, help="filters in the first level")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.crop_size % 4:
        print(f"error: --crop_size must be divisible by 4, got {args.crop_size}", file=sys.stderr)
        return 2
    if Path(args.out).exists() and not args.overwrite:
        print(f"{args.out} exists; --overwrite to retrain")
        return 0
    seed_everything(args.seed)
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    opt = argparse.Namespace(**vars(args), phase="train", no_flip=False, serial_batches=False)
    try:
        dataset = UnalignedDataset(opt)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=False)
    net = ShapeExtractor(1, 1, args.nf).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    start, done, loss = time.time(), 0, torch.zeros(())
    with tqdm(total=args.iters, desc="shape extractor") as bar:
        while done < args.iters:
            for batch in loader:
                images = torch.cat([batch["A"], batch["B"]]).to(device)
                targets = torch.cat([batch["shape_A"], batch["shape_B"]]).to(device)
                loss = segmentation_loss(net(images), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if done >= args.iters:
                    break
    net.eval()
    with torch.no_grad():
        batch = next(iter(loader))
        images = torch.cat([batch["A"], batch["B"]]).to(device)
        dice = 1 - shape_consistency_loss(
            (net(images) > 0).float(), torch.cat([batch["shape_A"], batch["shape_B"]]).to(device)
        )
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    # the slices it learnt shapes from: a CycleGAN run on other slices is told (a shape at 2 mm
    # voxels is twice the size of the same one at 1 mm)
    trained_on = {"spacing_mm": args.spacing_mm, "slice_axis": args.slice_axis, "crop_size": args.crop_size}
    save_checkpoint({"config": net.config(), "state_dict": state, "trained_on": trained_on}, args.out)
    print(
        f"shape extractor: {done} iterations in {time.time() - start:.1f} s, last loss {loss.item():.3f}, "
        f"training-batch Dice {dice.item():.3f}; saved {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: milliseconds per sample of the aligned datasets (prints figures, not a test).

    python -m benchmarks.bench_dataset [--crops 12] [--size 256 256 64] [--spacing_mm 1.0]
                                       [--runs 7] [--workers 0 2 4] [--batch_size 12]

Writes synthetic straightened crops of the reference's size (256 x 256 x 64 at 1 mm: box
vertebra bodies, textured CT) to a temporary folder, then reports for aligned_sagittal and
aligned_coronal: the first access of a crop (decode + slice table), the cached ``__getitem__``
(median over ``--runs`` epochs), and DataLoader throughput at each ``--workers`` count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data.aligned_coronal_dataset import AlignedCoronalDataset
from data.aligned_sagittal_dataset import AlignedSagittalDataset
from data.nifti_io import save_nifti
from util.atomic import write_json


def write_crops(root: Path, crops: int, size: tuple[int, int, int], spacing_mm: float, seed: int = 0) -> None:
    """``crops`` crops of one synthetic patient each: target 20 between 19 and 21, ~25 mm bodies."""
    rng = np.random.default_rng(seed)
    rows, ap, lr = size
    affine = np.diag([spacing_mm] * 3 + [1.0])
    body = int(round(25 / spacing_mm))
    disc = int(round(6 / spacing_mm))
    split: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for i in range(crops):
        label = np.zeros(size, np.uint8)
        centre = rows // 2 + int(rng.integers(-rows // 10, rows // 10 + 1))
        for vid, offset in ((19, -1), (20, 0), (21, 1)):
            top = centre - body // 2 + offset * (body + disc)
            label[max(top, 0) : max(top + body, 0), ap // 3 : 2 * ap // 3, lr // 8 : 7 * lr // 8] = vid
        ct = rng.integers(20, 80, size, dtype=np.uint8)
        ct[label > 0] = rng.integers(120, 220, int((label > 0).sum()), dtype=np.uint8)
        key = f"bench{i:03d}_20"
        save_nifti(root / "label" / f"{key}.nii.gz", label, affine, dtype=np.uint8)
        save_nifti(root / "CT" / f"{key}.nii.gz", ct, affine, dtype=np.uint8)
        split["train"][key] = 0
        split["test"][f"bench{i:03d}_19"] = 0  # a normal neighbour (grades count from every split)
    write_json(root / "vertebra_data.json", split)


def options(root: Path, **kw) -> argparse.Namespace:
    base = dict(
        dataroot=str(root),
        vertebra_json=str(root / "vertebra_data.json"),
        cam_folder=None,
        vert_class="normal",
        normal_max_grade=0,
        mask_height_mm=40.0,
        phase="train",
        isTrain=True,
        seed=0,
        crop_cache_dir=None,
        min_area_mm2=50.0,
        hole_margin_mm=4.0,
        slice_fraction=0.8,
    )
    base.update(kw)
    return argparse.Namespace(**base)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=12)
    parser.add_argument("--size", type=int, nargs=3, default=[256, 256, 64])
    parser.add_argument("--spacing_mm", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument(
        "--torch_threads", type=int, default=1, help="intra-op threads here (loader workers always use 1)"
    )
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    size = tuple(opt.size)
    torch.set_num_threads(opt.torch_threads)
    print(
        f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"{opt.crops} crops "
        f"{size[0]}x{size[1]}x{size[2]} at {opt.spacing_mm} mm; medians over {opt.runs} epochs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_crops(root, opt.crops, size, opt.spacing_mm)
        for cls in (AlignedSagittalDataset, AlignedCoronalDataset):
            ds = cls(options(root))
            start = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            first = (time.perf_counter() - start) / len(ds) * 1e3
            per_epoch = []
            for epoch in range(opt.runs):
                ds.set_epoch(epoch)
                start = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                per_epoch.append((time.perf_counter() - start) / len(ds) * 1e3)
            print(
                f"{cls.__name__}: first access {first:.1f} ms/sample (decode + slice table); "
                f"cached __getitem__ {statistics.median(per_epoch):.2f} ms/sample "
                f"(min {min(per_epoch):.2f}, max {max(per_epoch):.2f})"
            )
            for workers in opt.workers:
                loader = torch.utils.data.DataLoader(
                    ds,
                    batch_size=opt.batch_size,
                    shuffle=True,
                    num_workers=workers,
                    persistent_workers=workers > 0,
                )
                for _ in loader:  # warm the workers' caches
                    pass
                times = []
                for epoch in range(opt.runs):
                    ds.set_epoch(epoch)
                    start = time.perf_counter()
                    n = sum(len(batch["key"]) for batch in loader)
                    times.append((time.perf_counter() - start) / n * 1e3)
                med = statistics.median(times)
                print(
                    f"  DataLoader workers={workers} batch={opt.batch_size}: {med:.2f} ms/sample, "
                    f"{med * opt.batch_size:.1f} ms per batch (cached)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

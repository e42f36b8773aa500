"""Accuracy on the phantom: heights and de-pedicled volumes on straightened crops against truth.

    python -m benchmarks.phantom_crop_accuracy [--patients 6] [--spacing_mm 1.0] [--seed 0] [--workers 2]

Prints the share of vertebrae whose three heights are all within 1.5 mm of the truth, error
statistics per region, and the de-pedicled label volume against the truth body volume.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

from data.nifti_io import load_mask
from data.phantom import generate
from evaluation.heights import REGIONS, body_heights
from straighten import straighten_mask_3d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--spacing_mm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fracture_fraction", type=float, default=0.4)
    parser.add_argument("--workers", type=int, default=2)
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(
            root,
            opt.patients,
            opt.seed,
            opt.spacing_mm,
            fracture_fraction=opt.fracture_fraction,
            workers=opt.workers,
            progress=False,
        )
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            code = straighten_mask_3d.main(
                ["--dataroot", str(root), "--spacing_mm", str(opt.spacing_mm), "--workers", str(opt.workers)]
            )
        if code:
            raise SystemExit("straightening failed")
        with open(root / "truth" / "vertebrae.csv") as f:
            rows = list(csv.DictReader(f))
        errors, ratios = [], []
        for r in rows:
            pid, vid = r["pid"], int(r["vid"])
            lab = load_mask(root / "straightened" / "label" / f"{pid}_{vid}.nii.gz")
            body = lab.array == vid
            measured = body_heights(body, lab.spacing).as_array()
            errors.append(measured - np.array([float(r[f"fractured_{k}_mm"]) for k in REGIONS]))
            truth = load_mask(root / "truth" / pid / f"{pid}_body_msk.nii.gz")
            ratios.append(
                body.sum() * np.prod(lab.spacing) / ((truth.array == vid).sum() * np.prod(truth.spacing))
            )
    errors, ratios = np.array(errors), np.array(ratios)
    worst = np.abs(errors).max(axis=1)
    grades = np.bincount([int(r["grade"]) for r in rows], minlength=4)
    print(
        f"{opt.patients} phantom patients at {opt.spacing_mm} mm, {len(rows)} vertebrae "
        f"(grades 0/1/2/3: {'/'.join(map(str, grades))})"
    )
    print(
        f"all three heights within 1.5 mm of truth: {100 * (worst <= 1.5).mean():.1f} % of vertebrae; "
        f"largest error {worst.max():.2f} mm"
    )
    for i, region in enumerate(REGIONS):
        e = errors[:, i]
        print(
            f"  {region:>9}: mean error {e.mean():+.2f} mm, mean |error| {np.abs(e).mean():.2f} mm, "
            f"max |error| {np.abs(e).max():.2f} mm"
        )
    print(
        f"de-pedicled volume / truth body volume: median {np.median(ratios):.3f}, "
        f"range {ratios.min():.3f}-{ratios.max():.3f}; "
        f"within 15 %: {100 * (np.abs(ratios - 1) < 0.15).mean():.0f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

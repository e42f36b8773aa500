"""HealthiVert demo: run what the project can do today, end to end, on an embedded default.

    python demo.py [--out demo_output] [--patients 2] [--seed 0] [--spacing_mm 2.0]

It needs no data and no downloads:

1. writes a synthetic spine phantom (CT, vertebra masks and the same patient before its
   fractures) and draws each patient's mid-sagittal plane next to its healthy truth;
2. writes the centroid files, straightens every patient and cuts one de-pedicled crop per
   vertebra, as for real scans;
3. measures anterior, middle and posterior heights on the crops and compares them with the
   phantom's truth;

and collects everything in ``<out>/report.html``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from data.label_schemes import vertebra_name
from data.nifti_io import load_ct, load_mask
from data.phantom import generate
from evaluation.heights import REGIONS, body_heights
from straighten import location_json_local, straighten_mask_3d
from util.errors import InputError
from util.plotting import draw_slice, save_figure, save_sagittal_preview
from util.report import Report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_output", help="output folder (replaced if it holds a demo)")
    parser.add_argument("--patients", type=int, default=2, help="phantom patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--spacing_mm", type=float, default=2.0, help="voxel size of the phantom")
    parser.add_argument("--levels", default="T10-L5", help="vertebral levels to draw")
    return parser


def phantom_section(report: Report, root: Path, rows: list[dict]) -> None:
    pids = sorted({r["pid"] for r in rows})
    report.section(
        "1. Synthetic spine phantom",
        f"{len(pids)} patients, {len(rows)} graded vertebrae. Left: the scan with its fractures; right: the "
        "same patient before them (the truth the real world never gives). Outlines: vertebra labels.",
    )
    figures = []
    for pid in pids:
        raw, truth = root / "raw" / pid, root / "truth" / pid
        png = root.parent / "figures" / f"{pid}_sagittal.png"
        save_sagittal_preview(
            [
                ("fractured", load_ct(raw / f"{pid}.nii.gz"), load_mask(raw / f"{pid}_msk.nii.gz")),
                (
                    "healthy truth",
                    load_ct(truth / f"{pid}_healthy.nii.gz"),
                    load_mask(truth / f"{pid}_healthy_msk.nii.gz"),
                ),
            ],
            png,
        )
        figures.append((png, f"{pid}: mid-sagittal plane"))
    report.figures(figures, width=520)
    header = ["pid", "vertebra", "grade", "type", "healthy A/M/P (mm)", "fractured A/M/P (mm)"]
    table = [
        [
            r["pid"],
            r["vid"],
            r["grade"],
            r["fracture_type"],
            "/".join(f"{float(r[f'healthy_{k}_mm']):.1f}" for k in ("anterior", "middle", "posterior")),
            "/".join(f"{float(r[f'fractured_{k}_mm']):.1f}" for k in ("anterior", "middle", "posterior")),
        ]
        for r in rows
    ]
    report.table(header, table, highlight=[int(r["grade"]) > 0 for r in rows])


def straighten_section(report: Report, root: Path, rows: list[dict], spacing: float) -> tuple[float, float]:
    """Crops of every vertebra and their heights against the truth.

    Returns the share of vertebrae within one voxel of the truth and the largest error (mm).
    """
    report.section(
        "2. Straightened, de-pedicled crops",
        "Each crop is a rigid reslice in the spine curve's frame at its vertebral body: axis 0 along the "
        "spine, the body centred, neighbours kept, posterior elements removed from the labels. Titles: "
        "heights (anterior/middle/posterior, mm) measured on the crop.",
    )
    table, errors, figures = [], [], []
    for pid in sorted({r["pid"] for r in rows}):
        mine = [r for r in rows if r["pid"] == pid]
        fig, axes = plt.subplots(1, len(mine), figsize=(1.6 * len(mine), 3.6))
        for ax, r in zip(np.atleast_1d(axes), mine, strict=True):
            vid = int(r["vid"])
            lab = load_mask(root / "straightened" / "label" / f"{pid}_{vid}.nii.gz")
            ct = load_ct(root / "straightened" / "CT" / f"{pid}_{vid}.nii.gz")
            measured = body_heights(lab.array == vid, lab.spacing).as_array()
            truth = np.array([float(r[f"fractured_{k}_mm"]) for k in REGIONS])
            err = measured - truth
            errors.append(np.abs(err).max())
            k = int(round(np.nonzero(lab.array == vid)[2].mean()))
            draw_slice(
                ax,
                ct.array[:, :, k] / 255.0,
                lab.array[:, :, k],
                tuple(lab.spacing[:2]),
                f"{vertebra_name(vid)} g{r['grade']}\n" + "/".join(f"{h:.0f}" for h in measured),
                windowed=True,
            )
            table.append(
                [
                    pid,
                    vertebra_name(vid),
                    r["grade"],
                    r["fracture_type"],
                    "/".join(f"{t:.1f}" for t in truth),
                    "/".join(f"{m:.1f}" for m in measured),
                    float(np.abs(err).max()),
                ]
            )
        png = root.parent / "figures" / f"{pid}_crops.png"
        save_figure(fig, png)
        figures.append((png, f"{pid}: mid-sagittal plane of each crop"))
    report.figures(figures, width=900)
    errors = np.array(errors)
    within = float((errors <= spacing).mean())
    report.text(
        f"Heights measured on {spacing:g} mm crops are within one voxel of the truth for "
        f"{100 * within:.0f} % of vertebrae (largest error {errors.max():.2f} mm)."
    )
    header = ["pid", "vertebra", "grade", "type", "truth A/M/P (mm)", "measured A/M/P (mm)", "max error (mm)"]
    report.table(header, table, highlight=[e > spacing for e in errors])
    return within, float(errors.max())


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(opt.out)
    start = time.perf_counter()
    report = Report(out / "report.html", "HealthiVert demo")
    report.text(
        f"Phantom: {opt.patients} patients, levels {opt.levels}, {opt.spacing_mm} mm voxels, seed {opt.seed}."
    )
    try:
        generate(out / "data", opt.patients, opt.seed, opt.spacing_mm, opt.levels, overwrite=True)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = out / "data"
    with open(root / "truth" / "vertebrae.csv") as f:
        rows = list(csv.DictReader(f))
    phantom_section(report, root, rows)
    steps = (
        (location_json_local.main, ["--dataroot", str(root), "--overwrite"]),
        (
            straighten_mask_3d.main,
            ["--dataroot", str(root), "--spacing_mm", str(opt.spacing_mm), "--overwrite"],
        ),
    )
    for step, args in steps:
        if step(args) != 0:
            print("error: the pipeline stopped; see the messages above", file=sys.stderr)
            return 1
    within, worst = straighten_section(report, root, rows, opt.spacing_mm)
    path = report.save()
    print(
        f"demo finished in {time.perf_counter() - start:.1f} s: crop heights within one voxel of the truth "
        f"for {100 * within:.0f} % of {len(rows)} vertebrae (largest error {worst:.2f} mm); open {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

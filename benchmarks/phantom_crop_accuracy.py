"""Accuracy on the phantom: heights and de-pedicled volumes on straightened crops against truth.

    python -m benchmarks.phantom_crop_accuracy [--patients 6] [--spacing_mm 1.0] [--seed 0] [--workers 2]
        [--quirks] [--slice_mm 3] [--oblique_deg 5] [--lumbosacral_deg 20] [--osteophyte_mm 4]
        [--levels T10-L5] [--axial_rotation_deg 30] [--crop_ap anatomy|scanner] [--root DIR] [--details]

Prints the share of complete vertebrae whose three heights are all within 1.5 mm of the truth,
error statistics per region (by the definition, and by the crop's axes without the rim rule, the
definition before the body frame), the de-pedicled label volume against the truth body volume,
and, with ``--quirks`` (every quirk of :class:`data.phantom.Quirks`), how many cut vertebrae were
flagged and how many complete ones were flagged wrongly. ``--root DIR`` keeps the generated
dataset there (and reuses it, re-straightening only, when it already holds one); ``--details``
prints every complete vertebra's errors with the angle between its endplates and the slices.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data.nifti_io import load_mask
from data.phantom import Quirks, generate
from evaluation.heights import REGIONS, body_heights
from straighten import straighten_mask_3d
from straighten.centroids import read_completeness


def slice_angles(root: Path, pid: str) -> dict[int, float]:
    """Per vertebra of ``pid``, the angle (degrees) between its true height axis and the scan's
    slice axis (array axis 2 of the raw mask): 0 means its endplates lie in the slices."""
    geometry = json.loads((root / "truth" / pid / f"{pid}_geometry.json").read_text())
    mask = load_mask(root / "raw" / pid / f"{pid}_msk.nii.gz")
    slice_axis = mask.affine[:3, 2] / np.linalg.norm(mask.affine[:3, 2])
    return {
        int(g["vid"]): float(np.degrees(np.arccos(min(1.0, abs(np.dot(g["axes"]["height"], slice_axis))))))
        for g in geometry["vertebrae"]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=6)
    parser.add_argument("--spacing_mm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fracture_fraction", type=float, default=0.4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quirks", action="store_true", help="every quirk of real scans on")
    parser.add_argument("--slice_mm", type=float, default=0.0, help="slice thickness (e.g. 3)")
    parser.add_argument("--levels", default="T10-L5", help="full levels, e.g. T10,T11,L1-L5 (T12 missing)")
    parser.add_argument("--oblique_deg", type=float, default=0.0, help="oblique affine quirk (degrees)")
    parser.add_argument("--lumbosacral_deg", type=float, default=0.0, help="steep L5/S1 quirk (degrees)")
    parser.add_argument(
        "--axial_rotation_deg", type=float, default=0.0, help="quirk: patient turned about the spine (deg)"
    )
    parser.add_argument(
        "--crop_ap",
        default="anatomy",
        choices=("anatomy", "scanner"),
        help="straighten_mask_3d: anatomy or scanner",
    )
    parser.add_argument("--osteophyte_mm", type=float, default=0.0, help="anterior osteophyte quirk (mm)")
    parser.add_argument("--root", type=Path, default=None, help="keep (or reuse) the dataset here")
    parser.add_argument(
        "--label_resampling",
        default="distance",
        choices=("distance", "linear", "nearest"),
        help="passed to straighten_mask_3d (distance, linear, nearest)",
    )
    parser.add_argument("--details", action="store_true", help="print every complete vertebra's errors")
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    quirks = (
        Quirks.all_on(opt.slice_mm)
        if opt.quirks
        else (Quirks(slice_mm=opt.slice_mm) if opt.slice_mm else None)
    )
    if opt.oblique_deg or opt.lumbosacral_deg or opt.axial_rotation_deg:
        quirks = dataclasses.replace(
            quirks or Quirks(),
            oblique_deg=opt.oblique_deg,
            lumbosacral_deg=opt.lumbosacral_deg,
            axial_rotation_deg=opt.axial_rotation_deg,
        )
    if opt.osteophyte_mm:
        quirks = dataclasses.replace(quirks or Quirks(), osteophyte_mm=opt.osteophyte_mm)
    with contextlib.ExitStack() as stack:
        root = opt.root or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        # what the dataset was generated with: a reused --root must hold the dataset asked for
        asked = {
            "patients": opt.patients,
            "spacing_mm": opt.spacing_mm,
            "seed": opt.seed,
            "fracture_fraction": opt.fracture_fraction,
            "levels": opt.levels,
            "quirks": dataclasses.asdict(quirks) if quirks else None,
        }
        asked = json.loads(json.dumps(asked))  # as the record holds it (tuples as lists)
        record = root / "phantom_crop_accuracy_dataset.json"
        if (root / "truth" / "vertebrae.csv").is_file():
            held = json.loads(record.read_text()) if record.is_file() else None
            if held is None:
                raise SystemExit(f"error: {root} holds a dataset of unknown options; use another --root")
            if held != asked:
                diff = ", ".join(f"{k} {held[k]} (asked {asked[k]})" for k in asked if held[k] != asked[k])
                raise SystemExit(
                    f"error: {root} holds a dataset of other options: {diff}; use another --root"
                )
        else:
            record.unlink(missing_ok=True)
            generate(
                root,
                opt.patients,
                opt.seed,
                opt.spacing_mm,
                levels=opt.levels,
                fracture_fraction=opt.fracture_fraction,
                workers=opt.workers,
                progress=False,
                quirks=quirks,
            )
            record.write_text(json.dumps(asked))
        start = time.perf_counter()
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = straighten_mask_3d.main(
                ["--dataroot", str(root), "--spacing_mm", str(opt.spacing_mm), "--workers", str(opt.workers)]
                + ["--overwrite", "--label_resampling", opt.label_resampling, "--crop_ap", opt.crop_ap]
            )
        seconds = time.perf_counter() - start
        if code:
            last = err.getvalue().strip().splitlines()
            raise SystemExit(f"error: straightening failed: {last[-1] if last else f'exit {code}'}")
        with open(root / "truth" / "vertebrae.csv") as f:
            rows = list(csv.DictReader(f))
        errors, old_errors, ratios, missed, false_cut, details = [], [], [], [], [], []
        for r in rows:
            pid, vid = r["pid"], int(r["vid"])
            truth_complete = r["complete"] == "True"
            states = read_completeness(root / "raw" / pid / f"{pid}.json") or {}
            flagged = vid in states and not states[vid].complete
            if not truth_complete:
                (missed if not flagged else []).append(f"{pid}_{vid}")
                continue
            if flagged:
                false_cut.append(f"{pid}_{vid} ({states[vid].reason})")
                continue
            lab = load_mask(root / "straightened" / "label" / f"{pid}_{vid}.nii.gz")
            body = lab.array == vid
            truth_h = np.array([float(r[f"fractured_{k}_mm"]) for k in REGIONS])
            errors.append(body_heights(body, lab.spacing).as_array() - truth_h)
            old = body_heights(body, lab.spacing, align=False, exclude_rim=False).as_array()
            old_errors.append(old - truth_h)
            truth = load_mask(root / "truth" / pid / f"{pid}_body_msk.nii.gz")
            ratios.append(
                body.sum() * np.prod(lab.spacing) / ((truth.array == vid).sum() * np.prod(truth.spacing))
            )
            if opt.details:
                angle = slice_angles(root, pid)[vid]
                details.append(
                    f"  {pid}_{vid} grade {r['grade']} {r['fracture_type']:>10}, {angle:4.1f} deg to the "
                    f"slices: errors {np.array2string(errors[-1], precision=2)} mm, volume {ratios[-1]:.3f}"
                )
    errors, old_errors, ratios = np.array(errors), np.array(old_errors), np.array(ratios)
    worst = np.abs(errors).max(axis=1)
    grades = np.bincount([int(r["grade"]) for r in rows], minlength=4)
    n_cut = sum(r["complete"] != "True" for r in rows)
    if details:
        print("\n".join(details))
    print(
        f"{opt.patients} phantom patients at {opt.spacing_mm} mm"
        f"{f' with {opt.slice_mm} mm slices' if opt.slice_mm else ''}"
        f"{' with every quirk' if opt.quirks else ''}"
        f"{f' and a grid turned up to {opt.oblique_deg} deg' if opt.oblique_deg else ''}"
        f"{f' and L5/S1 steeper by up to {opt.lumbosacral_deg} deg' if opt.lumbosacral_deg else ''}"
        f"{f' and turned by up to {opt.axial_rotation_deg} deg' if opt.axial_rotation_deg else ''}"
        f"{f' and osteophytes up to {opt.osteophyte_mm} mm' if opt.osteophyte_mm else ''}, "
        f"crop AP from the {opt.crop_ap}, "
        f"{len(rows)} full levels ({opt.levels}) "
        f"(grades 0/1/2/3: {'/'.join(map(str, grades))}), {n_cut} cut by the field of view; "
        f"straightened in {seconds / opt.patients:.1f} s/patient ({opt.workers} workers)"
    )
    print(
        f"cut vertebrae flagged: {n_cut - len(missed)}/{n_cut}; "
        f"complete ones flagged: {len(false_cut)} {false_cut}"
    )
    print(
        f"all three heights within 1.5 mm of truth: {100 * (worst <= 1.5).mean():.1f} % of {len(worst)} "
        f"complete vertebrae; largest error {worst.max():.2f} mm "
        f"(crop axes, no rim rule: {100 * (np.abs(old_errors).max(axis=1) <= 1.5).mean():.1f} %)"
    )
    for i, region in enumerate(REGIONS):
        e, o = errors[:, i], old_errors[:, i]
        print(
            f"  {region:>9}: mean error {e.mean():+.2f} mm, mean |error| {np.abs(e).mean():.2f} mm, "
            f"max |error| {np.abs(e).max():.2f} mm (crop axes, no rim rule: mean {o.mean():+.2f}, "
            f"max |error| {np.abs(o).max():.2f})"
        )
    print(
        f"de-pedicled volume / truth body volume: median {np.median(ratios):.3f}, "
        f"range {ratios.min():.3f}-{ratios.max():.3f}; "
        f"within 10 %: {100 * (np.abs(ratios - 1) < 0.10).mean():.0f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

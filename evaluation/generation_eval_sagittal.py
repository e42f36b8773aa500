"""Generation metrics of a synthesis: SSIM, PSNR, Dice, and errors against the true anatomy.

    python evaluation/generation_eval_sagittal.py --dataroot D --output-folder O --result-folder R
        [--json-path D/vertebra_data.json] [--phase val] [--grades 0] [--plane sagittal|coronal]
        [--truth D/truth] [--central-fraction 1.0] [--min-area-mm2 400] [--overwrite]

Against the input crops (``R/generation_eval.csv``): for the vertebrae of ``--phase`` with a grade
in ``--grades`` (default 0: healthy, where the input is the right answer), the synthesis
``O/CT_fake``, ``O/label_fake`` against ``D/straightened/CT``, ``label``: global and band SSIM/PSNR
and Dice/IoU/RVD of the target, over the synthesised slices only (evaluation/generation_metrics.py).

Against the truth (``--truth``, a phantom's ``truth/``; ``R/truth_eval.csv``): for every fractured
vertebra of ``--phase``, the pseudo-healthy result against the same patient before the fracture,
resampled onto the crop's grid through its affine and windowed as the crop was: band (and global)
SSIM/PSNR, Dice/IoU against the true healthy body, and the height error in mm against
``truth/vertebrae.csv`` (``err_*``) and against the healthy body measured on the crop grid by the
same function (``err_measured_*``, free of the measurement's own error).

Both tables give the body's shape as ``full_share``: the share of the synthesised target's columns
as tall as their slice's tallest (:func:`evaluation.generation_metrics.full_height_share`), beside
``full_share_reference`` of the input's (or the true healthy) body on the same slices. A synthesis
that fills its inserted rows flat has a higher share than the body, and its middle height comes
out too tall.

``R/summary.json`` holds the means over vertebrae. Reruns skip a finished folder unless --overwrite.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data.base_dataset import SPLITS
from data.crops import CropStore
from data.layout import curve_path
from data.nifti_io import load_ct, load_mask, read_header
from evaluation import generation_metrics as gm
from evaluation.eval_io import (
    check_output_folder,
    csv_text,
    fake_path,
    load_fake,
    read_truth_table,
    run_script,
    split_entries,
    target_of,
)
from evaluation.heights import REGIONS
from evaluation.rhlv import design_heights
from util.atomic import read_json, write_json, write_text
from util.errors import input_error

log = logging.getLogger(__name__)

BASE_COLUMNS = ("vertebra", "pid", "vid", "grade", "split", "n_slices", "n_image_slices")
SHAPE_COLUMNS = ("full_share", "full_share_reference")
EVAL_COLUMNS = (*BASE_COLUMNS, *gm.IMAGE_METRICS, "dice", "iou", "rvd", *SHAPE_COLUMNS)
TRUTH_COLUMNS = (
    *BASE_COLUMNS,
    "fracture_type",
    *gm.IMAGE_METRICS,
    "dice",
    "iou",
    "rvd",
    *SHAPE_COLUMNS,
    *(f"h_syn_{r}" for r in REGIONS),
    *(f"h_true_{r}" for r in REGIONS),
    *(f"err_{r}" for r in REGIONS),
    *(f"err_measured_{r}" for r in REGIONS),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True, help="dataset root (or its straightened/ folder)")
    parser.add_argument(
        "--output-folder", required=True, help="synthesis output with CT_fake/ and label_fake/"
    )
    parser.add_argument("--result-folder", required=True, help="where the CSVs and summary.json go")
    parser.add_argument("--json-path", help="split file (default: <dataroot>/vertebra_data.json)")
    parser.add_argument("--phase", default="val", help="split(s) to evaluate, comma-separated, or 'all'")
    parser.add_argument("--grades", default="0", help="grades compared with their input crop (comma list)")
    parser.add_argument("--plane", choices=tuple(gm.PLANES), default="sagittal", help="the synthesis plane")
    parser.add_argument(
        "--truth", help="a phantom's truth/ folder: compare fractured vertebrae with the truth"
    )
    parser.add_argument(
        "--central-fraction",
        type=float,
        default=1.0,
        help="evaluate this central share of the target's slices (the reference synthesised 0.8)",
    )
    parser.add_argument(
        "--min-area-mm2",
        type=float,
        default=400.0,
        help="image metrics on slices where the target covers this",
    )
    parser.add_argument("--overwrite", action="store_true", help="redo a finished result folder")
    return parser


def _round(value: float, digits: int = 5) -> float | str:
    return round(float(value), digits) if np.isfinite(value) else ""


class TruthCache:
    """A phantom's healthy volumes and straightening windows, read once per patient."""

    def __init__(self, truth_dir: Path, straightened_root: Path):
        self.dir = truth_dir
        self.root = straightened_root
        self.table = read_truth_table(truth_dir)
        self._pid: str | None = None
        self._volumes = None

    def volumes(self, pid: str):
        if pid != self._pid:
            ct = load_ct(self.dir / pid / f"{pid}_healthy.nii.gz")
            mask = load_mask(self.dir / pid / f"{pid}_healthy_msk.nii.gz")
            if ct.shape != mask.shape or not np.allclose(ct.affine, mask.affine, atol=1e-3):
                raise input_error(mask.path, "healthy mask and healthy CT are not on one grid")
            raw = self.root / "raw" / pid / f"{pid}_msk.nii.gz"
            if raw.is_file():  # the truth must be of the scan the crops were cut from
                scan = read_header(raw, "mask")
                if tuple(scan.shape[:3]) != tuple(ct.shape) or not np.allclose(
                    scan.affine, ct.affine, atol=1e-3
                ):
                    raise input_error(ct.path, f"not on the grid of {raw}: the truth of another phantom?")
            record = read_json(
                curve_path(self.root, pid), "straightening record", "straighten the phantom first"
            )
            self._pid, self._volumes = pid, (ct, mask, tuple(record.get("window_hu", (-300.0, 800.0))))
        return self._volumes


def shape_metrics(reference: np.ndarray, synthesis: np.ndarray, plane: str, slices: np.ndarray) -> dict:
    """:func:`gm.full_height_share` of the synthesis and of the reference body on the same slices."""
    return {
        "full_share": gm.full_height_share(synthesis, plane, slices),
        "full_share_reference": gm.full_height_share(reference, plane, slices),
    }


def evaluate_input(crop, fake_ct, fake_target, opt, min_area_px) -> dict:
    """Metrics of a synthesis against its own input crop."""
    target = crop.label == crop.vid
    slices = gm.synthesised_slices(target, fake_ct, opt.plane, opt.central_fraction)
    img = gm.image_metrics(crop.ct, fake_ct, target, opt.plane, slices, min_area_px)
    overlap = gm.overlap_metrics(target, fake_target, opt.plane, slices)
    shape = shape_metrics(target, fake_target, opt.plane, slices)
    return {"n_slices": int(slices.size), **img, **overlap, **shape}


def evaluate_truth(crop, fake_ct, fake_target, truth: TruthCache, opt, min_area_px) -> dict:
    """Metrics of a pseudo-healthy synthesis against the true pre-fracture vertebra."""
    ct, mask, window = truth.volumes(crop.pid)
    true_ct, true_body = gm.truth_on_crop(
        ct.array, mask.array, ct.affine, crop.affine, crop.label.shape, crop.vid, window
    )
    original = crop.label == crop.vid
    slices = gm.synthesised_slices(true_body | original, fake_ct, opt.plane, opt.central_fraction)
    img = gm.image_metrics(true_ct, fake_ct, true_body, opt.plane, slices, min_area_px, original)
    overlap = gm.overlap_metrics(true_body, fake_target, opt.plane, slices)
    h_syn = design_heights(fake_target, crop.spacing_mm)[1:]
    h_measured = design_heights(true_body, crop.spacing_mm)[1:]
    h_true = truth.table[(crop.pid, crop.vid)].healthy_mm
    shape = shape_metrics(true_body, fake_target, opt.plane, slices)
    row = {"n_slices": int(slices.size), **img, **overlap, **shape}
    for i, r in enumerate(REGIONS):
        row[f"h_syn_{r}"] = h_syn[i]
        row[f"h_true_{r}"] = h_true[i]
        row[f"err_{r}"] = h_syn[i] - h_true[i]
        row[f"err_measured_{r}"] = h_syn[i] - h_measured[i]
    return row


def summarise(rows: list[dict], columns: tuple[str, ...]) -> dict:
    """Means over vertebrae of every numeric metric column."""
    out: dict = {"n": len(rows)}
    skip = set(BASE_COLUMNS) | {"fracture_type"}
    for c in columns:
        if c in skip:
            continue
        vals = np.array([r[c] for r in rows if r[c] != ""], dtype=np.float64)
        out[c] = round(float(vals.mean()), 5) if vals.size else None
    for prefix in ("err", "err_measured"):
        if rows and f"{prefix}_anterior" in rows[0]:
            e = np.abs(
                [[r[f"{prefix}_{g}"] if r[f"{prefix}_{g}"] != "" else np.nan for g in REGIONS] for r in rows]
            )
            mae = float(np.nanmean(e)) if np.isfinite(e).any() else None
            out[f"height_mae{prefix[3:]}_mm"] = None if mae is None else round(mae, 5)
    return out


def run(opt: argparse.Namespace) -> dict:
    check_output_folder(opt.output_folder, ("CT_fake", "label_fake"))
    store = CropStore(opt.dataroot, need_ct=True)
    if not len(store):
        raise input_error(opt.dataroot, "no straightened crops with both CT and label")
    json_path = opt.json_path or (
        Path(opt.dataroot) / "vertebra_data.json"
        if (Path(opt.dataroot) / "vertebra_data.json").exists()
        else store.folder.parent / "vertebra_data.json"
    )
    phases = SPLITS if opt.phase == "all" else tuple(p.strip() for p in opt.phase.split(",") if p.strip())
    if not phases or set(phases) - set(SPLITS):
        raise input_error(None, f"--phase must name splits of {SPLITS} or 'all', got {opt.phase!r}")
    try:
        grades = {int(g) for g in opt.grades.split(",") if g.strip()}
    except ValueError:
        raise input_error(None, f"--grades must be a comma list of 0-3, got {opt.grades!r}") from None
    if not 0 < opt.central_fraction <= 1:
        raise input_error(None, f"--central-fraction must be in (0, 1], got {opt.central_fraction}")
    if not (np.isfinite(opt.min_area_mm2) and opt.min_area_mm2 >= 0):
        raise input_error(None, f"--min-area-mm2 must be a finite area >= 0, got {opt.min_area_mm2}")
    entries = split_entries(json_path, phases)
    truth = TruthCache(Path(opt.truth), store.folder.parent) if opt.truth else None
    if truth is not None:  # the split file and the truth table come from one phantom
        truth_csv = Path(opt.truth) / "vertebrae.csv"
        for e in entries:
            row = truth.table.get((e.pid, e.vid))
            if row is None:
                raise input_error(
                    truth_csv, f"has no row for {e.key} of {json_path}: the truth of another phantom?"
                )
            if row.grade != e.grade:
                raise input_error(
                    truth_csv,
                    f"grade {row.grade} of {e.key} differs from {e.grade} in {json_path}: "
                    "the truth of another phantom?",
                )
    eval_rows, truth_rows = [], []
    missing = 0
    for e in tqdm(entries, desc=f"generation metrics ({opt.plane})", unit="vertebra"):
        in_truth = truth is not None and (e.pid, e.vid) in truth.table
        fractured = in_truth and truth.table[(e.pid, e.vid)].grade >= 1
        if e.grade not in grades and not fractured:
            continue
        if e.key not in store:
            missing += 1
            continue
        if not all(fake_path(opt.output_folder, k, e.key).exists() for k in ("CT_fake", "label_fake")):
            missing += 1
            continue
        crop = store.load(e.key)
        if not (crop.label == crop.vid).any():
            raise input_error(store.paths(e.key)[1], f"the crop holds no voxel of its vertebra {crop.vid}")
        fake_ct = load_fake(opt.output_folder, "CT_fake", crop)
        fake_target = target_of(load_fake(opt.output_folder, "label_fake", crop), e.vid)
        min_area_px = int(opt.min_area_mm2 / float(np.prod(np.delete(crop.spacing_mm, gm.PLANES[opt.plane]))))
        base = {"vertebra": e.key, "pid": e.pid, "vid": e.vid, "grade": e.grade, "split": e.split}
        if e.grade in grades:
            eval_rows.append(base | evaluate_input(crop, fake_ct, fake_target, opt, min_area_px))
        if fractured:
            row = evaluate_truth(crop, fake_ct, fake_target, truth, opt, min_area_px)
            truth_rows.append(base | {"fracture_type": truth.table[(e.pid, e.vid)].fracture_type} | row)
    if not eval_rows and not truth_rows:
        raise input_error(
            opt.output_folder, f"no vertebra of {'+'.join(phases)} to evaluate ({missing} without synthesis)"
        )
    result = Path(opt.result_folder)
    eval_rows = [{k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()} for r in eval_rows]
    truth_rows = [{k: (_round(v) if isinstance(v, float) else v) for k, v in r.items()} for r in truth_rows]
    summary = {
        "plane": opt.plane,
        "phase": list(phases),
        "grades": sorted(grades),
        "central_fraction": opt.central_fraction,
        "without_synthesis": missing,
        "input": summarise(eval_rows, EVAL_COLUMNS),
    }
    write_text(result / "generation_eval.csv", csv_text(eval_rows, EVAL_COLUMNS))
    if truth is not None:
        summary["truth"] = summarise(truth_rows, TRUTH_COLUMNS)
        write_text(result / "truth_eval.csv", csv_text(truth_rows, TRUTH_COLUMNS))
    else:  # a table of an earlier run with --truth would disagree with this summary
        (result / "truth_eval.csv").unlink(missing_ok=True)
    write_json(result / "summary.json", summary)  # last: marks the folder finished
    return summary


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    done = Path(opt.result_folder) / "summary.json"

    def summary(s: dict, seconds: float) -> str:
        line = f"evaluated {s['input']['n']} vertebrae against their input ({opt.plane})"
        if s["input"]["n"]:
            line += f": band SSIM {s['input']['ssim_band']}, Dice {s['input']['dice']}"
        if "truth" in s:
            t = s["truth"]
            line += f"; {t['n']} fractured against the truth: height MAE {t.get('height_mae_mm')} mm"
        return f"{line}; in {seconds:.1f} s; {done}"

    return run_script(done, opt.overwrite, "evaluate", lambda: run(opt), summary)


if __name__ == "__main__":
    sys.exit(main())

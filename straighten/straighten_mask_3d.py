"""Straighten every patient along its spine and cut one crop per vertebra.

    python straighten/straighten_mask_3d.py --dataroot D [--spacing_mm 1.0] [--crop_mm 256 256 64]
        [--window -300 800] [--label_scheme verse|totalseg] [--labels_only] [--workers N]
        [--shard i/n] [--overwrite] [--crop_ap anatomy|scanner]

Reads ``D/raw/<pid>/<pid>.nii.gz`` (CT, absent with ``--labels_only``), ``<pid>_msk.nii.gz`` and
the centroid json from ``location_json_local.py``. Writes ``D/straightened/CT/<pid>_<vid>.nii.gz``
(HU window mapped to 0-255, uint8), ``D/straightened/label/<pid>_<vid>.nii.gz`` (VerSe ids,
neighbours kept, posterior elements removed) and ``D/straightened/curve/<pid>.json``.

Crops: axis 0 along the spine (superior to inferior) with the target's body centred, axis 1
anterior to posterior (by default from the vertebra's body to its posterior elements; the
scanner's posterior with ``--crop_ap scanner`` or where the label has no posterior elements),
axis 2 right to left, ``--spacing_mm`` voxels in every direction; the
affine states that voxel size with positions local to the curve.

Faults: options are checked before any work (finite numbers, crops that fit in memory; exit 2).
A patient that fails for any reason (bad input, unwritable output, memory) gets one ``error:``
line naming the file, loses its outputs so no rerun takes them for finished, and the others go
on (exit 1). A patient counts as done only if its curve json and every crop it lists are whole.
A rerun whose crop options (``--spacing_mm``, ``--crop_mm``, ``--window``, ``--label_scheme``,
``--label_resampling``, ``--crop_ap``, ``--smoothing_mm``) differ from those a finished patient's
curve json records is refused before any work (one line, exit 2) unless ``--overwrite``; curve
jsons from before the options were recorded are kept, with a warning naming what is unknown.
Ctrl-C stops with one line and exit 130; the patients cut short leave no files.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from data import label_schemes
from data.layout import curve_path, list_patients, shard
from straighten.patient import CROP_AP_MODES, StraightenOptions, option_differences, run_patient
from util.errors import InputError
from util.memory import too_big


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True, help="dataset root holding raw/<pid>/")
    parser.add_argument("--spacing_mm", type=float, default=1.0, help="voxel size of the crops (mm)")
    parser.add_argument(
        "--crop_mm",
        type=float,
        nargs=3,
        default=(256.0, 256.0, 64.0),
        metavar=("SPINE", "AP", "LR"),
        help="crop size in mm",
    )
    parser.add_argument(
        "--window",
        type=float,
        nargs=2,
        default=(-300.0, 800.0),
        metavar=("LO", "HI"),
        help="HU window mapped to 0-255",
    )
    parser.add_argument("--label_scheme", default="verse", choices=sorted(label_schemes.SCHEMES))
    parser.add_argument("--labels_only", action="store_true", help="mask-only data: write label crops only")
    parser.add_argument(
        "--smoothing_mm",
        type=float,
        default=1.0,
        help="how far (RMS, mm) the spine curve may pass from the centroids",
    )
    parser.add_argument(
        "--label_resampling",
        default="distance",
        choices=("distance", "linear", "nearest"),
        help="label crops: each label's signed distance (default) or mask, trilinear, or nearest neighbour",
    )
    parser.add_argument(
        "--crop_ap",
        default="anatomy",
        choices=CROP_AP_MODES,
        help="crops' AP axis: each body towards its posterior elements (default) or the scanner's posterior",
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--shard", default=None, help="process only shard i/n of the patients")
    parser.add_argument("--overwrite", action="store_true", help="redo patients whose crops exist")
    return parser


# Bytes per crop voxel held while one patient is cut (label, body, CT crops of up to 26
# vertebrae until they are written, plus the float CT resample), and a spine length for the
# first-pass straightened volume: a generous upper estimate of one patient's memory.
BYTES_PER_CROP_VOXEL = 26 * 4 + 8
SPINE_LENGTH_MM = 800.0


def patient_memory_bytes(spacing_mm: float, crop_mm: tuple[float, float, float]) -> float:
    """Estimated peak memory of straightening one patient at ``spacing_mm`` (bytes)."""
    n_rows, n_ap, n_lr = (c / spacing_mm for c in crop_mm)
    return n_rows * n_ap * n_lr * BYTES_PER_CROP_VOXEL + SPINE_LENGTH_MM / spacing_mm * n_ap * n_lr * 4


def option_problem(opt: argparse.Namespace) -> str | None:
    """The first thing wrong with the options (checked before any work), or None."""
    finite = (opt.spacing_mm, *opt.crop_mm, *opt.window, opt.smoothing_mm)
    if not all(math.isfinite(x) for x in finite):
        bad = next(
            name
            for name, vals in (
                ("--spacing_mm", [opt.spacing_mm]),
                ("--crop_mm", opt.crop_mm),
                ("--window", opt.window),
                ("--smoothing_mm", [opt.smoothing_mm]),
            )
            if not all(math.isfinite(x) for x in vals)
        )
        return f"{bad} must be finite numbers"
    if opt.spacing_mm <= 0 or min(opt.crop_mm) <= 0:
        return "--spacing_mm and --crop_mm must be positive"
    if opt.window[1] <= opt.window[0]:
        return f"--window LO HI needs LO < HI, got {opt.window[0]:g} {opt.window[1]:g}"
    if opt.smoothing_mm < 0:
        return "--smoothing_mm must not be negative"
    if opt.workers < 1:
        return f"--workers must be at least 1, got {opt.workers}"
    crop = " ".join(f"{c:g}" for c in opt.crop_mm)
    if min(opt.crop_mm) < opt.spacing_mm:
        return f"--crop_mm {crop} is smaller than one voxel of --spacing_mm {opt.spacing_mm:g}"
    need = patient_memory_bytes(opt.spacing_mm, tuple(opt.crop_mm)) * opt.workers
    problem = too_big(need)
    if problem:
        shape = " x ".join(str(int(round(c / opt.spacing_mm))) for c in opt.crop_mm)
        return (
            f"--spacing_mm {opt.spacing_mm:g} with --crop_mm {crop} "
            f"makes crops of {shape} voxels; {opt.workers} worker(s) would need {problem}"
        )
    return None


def finished_with_other_options(
    root: Path, pids: list[str], settings: StraightenOptions
) -> tuple[str | None, str | None]:
    """(why the run must not go on: patients finished with other options; a note on patients whose
    curve json does not record some options), each None when there is nothing to say.

    Only the curve jsons are read; nothing is written.
    """
    differ, unknown = {}, {}
    for pid in pids:
        changed, flags = option_differences(root, pid, settings)
        if changed:
            differ[pid] = changed
        elif flags:
            unknown[pid] = flags
    problem = note = None
    if differ:
        pid, changed = next(iter(differ.items()))
        others = f" (and {len(differ) - 1} more patients)" if len(differ) > 1 else ""
        problem = (
            f"{curve_path(root, pid)}{others}: made with other options ({'; '.join(changed)}); "
            "pass --overwrite to redo them with these"
        )
    if unknown:
        flags = sorted({f for fs in unknown.values() for f in fs})
        note = (
            f"{len(unknown)} finished patients (e.g. {next(iter(unknown))}) have curve jsons from before "
            f"the options were recorded: {', '.join(flags)} unknown; kept as done (--overwrite redoes them)"
        )
    return problem, note


def _quiet_interrupt(signum, frame) -> None:
    """Workers end on Ctrl-C without a traceback (their temporary files are removed on the way)."""
    raise SystemExit(130)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, _quiet_interrupt)


def _run_all(opt: argparse.Namespace, pids: list[str], settings: StraightenOptions, results, failed) -> None:
    """Straighten ``pids``, appending to ``results`` and ``failed`` as patients end."""
    bar = tqdm(total=len(pids), desc="straighten", unit="patient")
    try:
        if opt.workers > 1 and len(pids) > 1:
            pool = ProcessPoolExecutor(max_workers=opt.workers, initializer=_worker_init)
            try:
                futures = [pool.submit(run_patient, opt.dataroot, pid, settings) for pid in pids]
                for fut in as_completed(futures):
                    result, error = fut.result()
                    (results.append(result) if result else failed.append(error))
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for pid in pids:
                result, error = run_patient(opt.dataroot, pid, settings)
                (results.append(result) if result else failed.append(error))
                bar.update()
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    problem = option_problem(opt)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    settings = StraightenOptions(
        opt.spacing_mm,
        tuple(opt.crop_mm),
        tuple(opt.window),
        opt.label_scheme,
        opt.labels_only,
        opt.smoothing_mm,
        opt.overwrite,
        opt.label_resampling,
        opt.crop_ap,
    )
    try:
        pids = shard(list_patients(opt.dataroot), opt.shard)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not opt.overwrite:
        problem, note = finished_with_other_options(Path(opt.dataroot), pids, settings)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
        if note:
            print(f"warning: {note}", file=sys.stderr)
    start = time.perf_counter()
    results, failed = [], []
    try:
        _run_all(opt, pids, settings, results, failed)
    except (KeyboardInterrupt, SystemExit, BrokenProcessPool):
        print(
            f"interrupted: stopped after {len(results)} patients reported finished and {len(failed)} "
            "failed; patients cut short left no files, a rerun does the rest",
            file=sys.stderr,
        )
        return 130
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    done = [r for r in results if not r.skipped]
    seconds = time.perf_counter() - start
    per = f", {seconds / len(done):.1f} s/patient" if done else ""
    print(
        f"straightened {len(done)} patients ({sum(len(r.vertebrae) for r in done)} vertebrae) "
        f"in {seconds:.1f} s"
        f"{per}; {len(results) - len(done)} already done, {len(failed)} failed; "
        f"crops in {Path(opt.dataroot) / 'straightened'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

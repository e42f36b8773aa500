"""Benchmark: seconds per patient to straighten at 1 mm, on one and two workers (prints figures).

    python -m benchmarks.bench_straighten [--patients 4] [--workers 1 2] [--shared ../shared/data]
        [--label_resampling distance nearest]

Two inputs: phantom patients (CT + mask, levels T10-L5, 1 mm) and copies of the TotalSegmentator
abdominal CT (3 mm, TotalSegmentator ids) from the shared sample data. The centroid step
(``location_json_local``, with the completeness of each vertebra) is timed on the latter. Each
``--label_resampling`` method is timed in the same run (the default, ``distance``, against the
nearest-neighbour label crops used before).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data.phantom import generate
from straighten import location_json_local, straighten_mask_3d

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one straightening run; CPU time counts this process only, which is
    all of it on one worker, and is less sensitive than wall time to a machine shared with others."""
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = straighten_mask_3d.main(args)
    if code != 0:
        raise SystemExit(f"straightening failed: {args}")
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--label_resampling", nargs="+", default=["distance"], choices=("distance", "linear", "nearest")
    )
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared sample data folder")
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"machine: {os.cpu_count()} CPUs; {opt.patients} patients per input; crops 256x256x64 mm at 1 mm")
    with tempfile.TemporaryDirectory() as tmp:
        phantom = Path(tmp) / "phantom"
        generate(phantom, opt.patients, seed=0, spacing_mm=1.0, progress=False)
        totalseg = Path(tmp) / "totalseg"
        source = opt.shared / "real" / "totalseg_abdomen_ct"
        for i in range(opt.patients):
            folder = totalseg / "raw" / f"ts{i}"
            folder.mkdir(parents=True)
            shutil.copy(source / "ct.nii.gz", folder / f"ts{i}.nii.gz")
            shutil.copy(source / "vert_msk_totalseg_ids.nii.gz", folder / f"ts{i}_msk.nii.gz")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            location_json_local.main(["--dataroot", str(totalseg), "--label_scheme", "totalseg"])
        seconds = time.perf_counter() - start
        per = seconds / opt.patients
        print(f"TotalSegmentator CT (3 mm), centroids and completeness: {per:.2f} s/patient")
        for name, root, extra in (
            ("phantom (T10-L5, 1 mm CT)", phantom, []),
            ("TotalSegmentator CT (3 mm)", totalseg, ["--label_scheme", "totalseg"]),
        ):
            for workers, method in [(w, m) for w in opt.workers for m in opt.label_resampling]:
                args = [
                    "--dataroot",
                    str(root),
                    "--spacing_mm",
                    "1.0",
                    "--workers",
                    str(workers),
                    "--overwrite",
                    "--label_resampling",
                    method,
                ]
                seconds, cpu = timed(args + extra)
                print(
                    f"{name}, {workers} worker(s), {method} labels: {seconds / opt.patients:.2f} s/patient "
                    f"({seconds:.1f} s for {opt.patients}; "
                    f"CPU of this process {cpu / opt.patients:.2f} s/patient)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: seconds to generate phantom patients (prints figures; not a test).

python -m benchmarks.bench_phantom [--patients 16] [--spacing_mm 2.0 1.0] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

from data.phantom import generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=16)
    parser.add_argument("--spacing_mm", type=float, nargs="+", default=[2.0, 1.0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--seed", type=int, default=0)
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"machine: {os.cpu_count()} CPUs; {opt.patients} patients, levels T10-L5 (+ partial ends)")
    for spacing in opt.spacing_mm:
        for workers in opt.workers:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                rows = generate(tmp, opt.patients, opt.seed, spacing, workers=workers, progress=False)
                seconds = time.perf_counter() - start
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs)
            print(
                f"spacing {spacing:.1f} mm, {workers} worker(s): {seconds:.1f} s for {opt.patients} patients "
                f"({seconds / opt.patients:.2f} s/patient, {len(rows)} vertebrae, "
                f"{size / 2**20:.0f} MiB written)"
            )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB (main), {peak_children:.0f} MiB (largest worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

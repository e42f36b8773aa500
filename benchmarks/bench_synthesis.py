"""Benchmark: seconds per vertebra of the iterative 3D synthesis, batched vs one slice per pass.

    python -m benchmarks.bench_synthesis [--spacing_mm 1.0] [--crop_mm 256 256 64] [--repeats 3]
        [--threads N] [--device cpu|cuda] [--batch_slices 0 1 8] [--neighbours synthesise|real] [--flops]

One straightened crop of the reference's geometry (default 256 x 256 x 64 mm at 1 mm: the
reference's crops) with box vertebrae (26 mm bodies, 6 mm discs, 44 x 56 mm sections: every
slice through the target is synthesised, with both neighbours), and a HealthiVert generator of
the default size (ngf 16, 0.99 M parameters) in its initial state (the cost of a forward pass
does not depend on the weights). Both modes run on the same crop in the same process,
alternating, and the medians over ``--repeats`` of the wall time and of the process's CPU time
are printed: ``batched`` (all slices of a step in one forward pass, what
eval_3d_sagittal_twostage.py does) and ``one slice`` (``--batch_slices 1``, the reference's
way). ``--neighbours real`` times the target alone between its real neighbours (one step
instead of three; eval_3d_sagittal_twostage.py's option). The reference took 65.2 s per vertebra
on a 2-core CPU machine (central 80 % of the slices only, its own order) and 4.1 s on an H100.

``--flops`` adds one more, untimed, run of each mode under torch's FLOP counter (the operations
the synthesis really executes: convolutions and attention matrix products) and a timed large
fp32 matrix product at the same thread count, and prints the **compute floor**: the FLOPs per
vertebra over that matrix-product rate, the time no kernel doing this arithmetic directly beats
on this machine (``benchmarks/compute_floor.py``), beside the target.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.compute_floor import count_gflops, matmul_gflops
from data.vertebra_sample import rows_for_mm
from eval_3d_sagittal_twostage import Run, weights_cached
from models import create_model
from models.synthesis import NEIGHBOUR_MODES, SynthesisSettings, synthesise_crop
from options.test_options import TestOptions

BODY_MM, DISC_MM, AP_MM, LR_MM = 26.0, 6.0, 44.0, 56.0


def box_crop(shape: tuple[int, int, int], spacing_mm: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 CT and labels: L1 (20) centred with T12 above and L2 below, T11 and L3 partly in view."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    body, pitch = round(BODY_MM / spacing_mm), round((BODY_MM + DISC_MM) / spacing_mm)
    ap, lr = round(AP_MM / spacing_mm), round(LR_MM / spacing_mm)
    a0, l0 = shape[1] // 2 - ap // 2, shape[2] // 2 - lr // 2
    for k, vid in zip(range(-2, 3), (18, 19, 20, 21, 22), strict=True):
        r0 = shape[0] // 2 - body // 2 + k * pitch
        if r0 + body > 0 and r0 < shape[0]:
            label[max(r0, 0) : r0 + body, a0 : a0 + ap, l0 : l0 + lr] = vid
    ct = rng.normal(50, 8, shape)
    ct[label > 0] = rng.normal(170, 15, int((label > 0).sum()))
    return np.clip(ct, 0, 255).astype(np.uint8), label


def healthivert_run(device: str) -> Run:
    argv = ["--model", "healthivert", "--dataset_mode", "aligned_sagittal", "--name", "bench"]
    argv += ["--gpu_ids", "0" if device == "cuda" else "-1", "--checkpoints_dir", "/nonexistent"]
    opt = TestOptions().parse(argv)
    torch.manual_seed(0)
    model = create_model(opt)
    model.eval()
    return Run("bench", opt, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spacing_mm", type=float, default=1.0)
    parser.add_argument("--crop_mm", type=float, nargs=3, default=[256.0, 256.0, 64.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--batch_slices",
        type=int,
        nargs="+",
        default=[0, 1],
        help="modes: slices per pass (0: all)",
    )
    parser.add_argument(
        "--neighbours",
        default="synthesise",
        choices=NEIGHBOUR_MODES,
        help="the neighbours first (the reference's order), or the target alone between the real ones",
    )
    parser.add_argument(
        "--flops",
        action="store_true",
        help="also count each mode's FLOPs per vertebra and print the compute floor (module docstring)",
    )
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if opt.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    shape = tuple(int(round(mm / opt.spacing_mm)) for mm in opt.crop_mm)
    ct, label = box_crop(shape, opt.spacing_mm)
    run = healthivert_run(opt.device)
    base = dict(
        hole_rows=max(1, rows_for_mm(run.opt.mask_height_mm, opt.spacing_mm)),
        margin_rows=rows_for_mm(run.opt.hole_margin_mm, opt.spacing_mm),
        min_area_px=200.0 / opt.spacing_mm**2,
        min_component_px=run.opt.min_area_mm2 / opt.spacing_mm**2,
        width=shape[1],
        row_spacing_mm=opt.spacing_mm,
    )
    modes = {{0: "batched", 1: "one slice"}.get(n, f"{n} slices"): n for n in opt.batch_slices}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    info: dict[str, tuple[int, int]] = {}
    print(
        f"crop {shape[0]}x{shape[1]}x{shape[2]} at {opt.spacing_mm:g} mm, device {opt.device}, "
        f"{torch.get_num_threads()} CPU threads, {opt.repeats} repeats, --neighbours {opt.neighbours}"
    )
    for _ in range(opt.repeats):
        for mode, batch_slices in modes.items():
            settings = SynthesisSettings(batch_slices=batch_slices, **base)
            if opt.device == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            with weights_cached():
                result = synthesise_crop(
                    ct, label, None, 20, "sagittal", run.synthesise, settings, neighbours_mode=opt.neighbours
                )
            if opt.device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - cpu_start)
            info[mode] = (sum(result.steps.values()), result.forward_passes)
    for mode in modes:
        med = statistics.median(times[mode])
        slices, passes = info[mode]
        print(
            f"{mode:>10}: {med:8.2f} s/vertebra (median; runs {', '.join(f'{t:.1f}' for t in times[mode])}), "
            f"{statistics.median(cpu[mode]):.2f} CPU s/vertebra, "
            f"{slices} slice syntheses in {passes} forward passes, {med / slices * 1000:.0f} ms per slice"
        )
    if opt.flops:
        rate = matmul_gflops(opt.device)
        print(f"fp32 {2048}x{2048} matrix product: {rate:.1f} GFLOP/s with {torch.get_num_threads()} threads")
        # the FLOP counter's module tracker hooks inputs that require grad, which fails under
        # inference_mode; the generator needs no grad here
        run.model.netG.requires_grad_(False)
        for mode, batch_slices in modes.items():
            settings = SynthesisSettings(batch_slices=batch_slices, **base)
            with torch.no_grad(), weights_cached():
                gflop = count_gflops(
                    lambda s=settings: synthesise_crop(
                        ct, label, None, 20, "sagittal", run.synthesise, s, neighbours_mode=opt.neighbours
                    )
                )
            total, conv, bmm = gflop["total"], gflop["convolution"], gflop["matmul"]
            print(
                f"{mode:>10}: {total:.4g} GFLOP per vertebra ({conv / total:.0%} convolutions, "
                f"{bmm / total:.0%} attention matrix products), "
                f"{total / info[mode][1]:.2f} GFLOP per forward pass; compute floor at "
                f"{rate:.1f} GFLOP/s: {total / rate:.1f} s per vertebra; measured "
                f"{total / statistics.median(times[mode]):.1f} GFLOP/s"
            )
    if "one slice" in modes:
        for mode in modes:
            if mode == "one slice":
                continue
            speedup = statistics.median(times["one slice"]) / statistics.median(times[mode])
            cpu_speedup = statistics.median(cpu["one slice"]) / statistics.median(cpu[mode])
            print(
                f"{mode}: {speedup:.2f}x the speed of one slice per forward pass "
                f"({cpu_speedup:.2f}x in CPU time; on a loaded machine the CPU time is the steadier figure)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

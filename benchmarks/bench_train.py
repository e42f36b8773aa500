"""Benchmark: seconds per HealthiVert training iteration, data-loading share, peak memory (prints figures).

    python -m benchmarks.bench_train [--configs 256x12 128x8] [--iters 3] [--dataroot D/straightened]
        [--vertebra_json D/vertebra_data.json] [--num_threads 0] [--torch_threads N] [--device cpu|cuda]
        [--no_amp] [--d_window band|full] [--grad_checkpoint auto|on|off] [--flops]

Each configuration ``SIZExBATCH`` runs in its own process (so peak memory is its own) at the
reference's model configuration (ngf 16, ndf 64, three PatchGANs, vanilla GAN; the table states
ngf/ndf, and ``--d_window`` / ``--grad_checkpoint`` pick the model's options): one warm-up
iteration, then ``--iters`` timed iterations of the real training loop (next batch from the
DataLoader, ``set_input``, ``optimize_parameters``). With ``--dataroot`` the batches come from
``aligned_sagittal`` on that straightened root when its slices have the configured size and
it holds at least a batch (``--vert_class all`` is used, to have more samples);
otherwise from synthetic samples of the sample contract (``tests/fixtures/synthetic_vertebra``),
whose loading cost is not representative (the loading share is then marked "synthetic").
Figures: median seconds per iteration, median data wait, loading share = wait / iteration,
peak memory (CPU: the process's peak resident set; CUDA: peak allocated by torch), and the
process's CPU seconds per iteration (on a machine shared with other jobs, CPU seconds with
``--torch_threads 1`` approximate the wall time the iteration would take on an idle core).
``--flops`` adds one untimed iteration under torch's FLOP counter and prints GFLOP per iteration
and the compute floor: those FLOPs at this machine's fp32 matrix-product rate with the same
threads, the time no kernel doing this arithmetic directly beats here
(``benchmarks/compute_floor.py``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_one(args: argparse.Namespace) -> dict:
    """Time one configuration in this process; returns the figures."""
    import torch

    from data import create_dataset
    from models import create_model
    from options.train_options import TrainOptions

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    size, batch = (int(v) for v in args.one.split("x"))
    common = ["--model", "healthivert", "--ngf", "16", "--ndf", "64", "--batch_size", str(batch)]
    common += ["--num_threads", str(args.num_threads), "--checkpoints_dir", "/tmp/bench_train_ckpt"]
    common += ["--gpu_ids", "0" if args.device == "cuda" else "-1", "--crop_size", str(size)]
    common += ["--no_amp"] if args.no_amp else []
    common += ["--d_window", args.d_window, "--grad_checkpoint", args.grad_checkpoint]
    source = "synthetic"
    opt = None
    if args.dataroot:
        real = TrainOptions().parse(
            [
                *common,
                "--dataset_mode",
                "aligned_sagittal",
                "--dataroot",
                args.dataroot,
                "--vert_class",
                "all",
            ]
            + (["--vertebra_json", args.vertebra_json] if args.vertebra_json else [])
        )
        dataset = create_dataset(real)
        if len(dataset.dataset) >= batch and tuple(dataset.dataset[0]["ct"].shape[-2:]) == (size, size):
            opt, source = real, "aligned_sagittal"
    if opt is None:
        synthetic = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--synthetic_samples"]
        opt = TrainOptions().parse([*common, *synthetic, str(batch * (args.iters + 1))])
        dataset = create_dataset(opt)
    torch.manual_seed(0)
    model = create_model(opt)
    model.setup(opt)
    model.train()
    waits, totals, cpu = [], [], []
    needed = args.iters + 1
    done = 0
    while done < needed:
        start, cpu_start = time.perf_counter(), time.process_time()
        for data in dataset:
            got = time.perf_counter()
            model.set_input(data)
            model.optimize_parameters()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            if done > 0:  # the first iteration is a warm-up
                waits.append(got - start)
                totals.append(end - start)
                cpu.append(time.process_time() - cpu_start)
            done += 1
            if done >= needed:
                break
            start, cpu_start = time.perf_counter(), time.process_time()
    if model.device.type == "cuda":
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
    it = statistics.median(totals)
    wait = statistics.median(waits)
    flops = {}
    if args.flops:
        from benchmarks.compute_floor import count_gflops, matmul_gflops

        model.set_input(next(iter(dataset)))
        gflop = count_gflops(model.optimize_parameters)["total"]
        rate = matmul_gflops(args.device)
        flops = {"gflop_per_iteration": gflop, "matmul_gflops": rate, "floor_s": gflop / rate}
    return {
        **flops,
        "config": args.one,
        "device": str(model.device),
        "amp": model.use_amp,
        "torch_threads": torch.get_num_threads(),
        "ngf_ndf": f"{opt.ngf}/{opt.ndf}",
        "options": f"{opt.d_window}/{opt.grad_checkpoint}",
        "data": source,
        "s_per_iteration": it,
        "cpu_s_per_iteration": statistics.median(cpu),
        "data_wait_s": wait,
        "loading_share_pct": 100 * wait / it,
        "peak_memory_gb": peak_gb,
        "iterations": len(totals),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["256x12", "128x8"], help="SIZExBATCH")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--dataroot", default=None, help="a straightened root for real batches")
    parser.add_argument("--vertebra_json", default=None)
    parser.add_argument("--num_threads", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (0: default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--no_amp", action="store_true", help="CUDA: fp32 instead of bf16 + channels_last")
    parser.add_argument("--d_window", default="band", choices=["band", "full"], help="local/seg D input")
    parser.add_argument("--grad_checkpoint", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--flops", action="store_true", help="also print GFLOP/it and the compute floor")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args)))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--configs"]
    passthrough = [a for a in passthrough if a not in args.configs]
    print(
        f"{'config':>8} {'device':>6} {'amp':>5} {'thr':>3} {'ngf/ndf':>7} {'window/ckpt':>11} "
        f"{'data':>16} {'s/it':>8} {'wait s':>7} "
        f"{'load %':>6} {'peak GB':>7} {'CPU s/it':>8}"
    )
    for config in args.configs:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), *passthrough, "--one", config],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"error: {config} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return 1
        r = json.loads(lines[-1][7:])
        print(
            f"{r['config']:>8} {r['device']:>6} {r['amp']!s:>5} {r['torch_threads']:>3} {r['ngf_ndf']:>7} "
            f"{r['options']:>11} {r['data']:>16} "
            f"{r['s_per_iteration']:>8.2f} {r['data_wait_s']:>7.3f} {r['loading_share_pct']:>6.1f} "
            f"{r['peak_memory_gb']:>7.2f} {r['cpu_s_per_iteration']:>8.2f}"
        )
        if "floor_s" in r:
            print(
                f"{'':>8} {r['gflop_per_iteration']:.0f} GFLOP per iteration; fp32 matrix product "
                f"{r['matmul_gflops']:.1f} GFLOP/s with {r['torch_threads']} threads: compute floor "
                f"{r['floor_s']:.2f} s per iteration, measured "
                f"{r['gflop_per_iteration'] / r['s_per_iteration']:.1f} GFLOP/s"
            )
    print(f"medians over {args.iters} iterations after one warm-up; machine shared with other jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training throughput: plain ``python train.py`` against ``torchrun --nproc_per_node N train.py``.

    python benchmarks/bench_distributed.py [--configs plain,torchrun1,torchrun2] [--repeats 3] \\
        [--samples 32] [--crop_size 64] [--batch_size 2] [--gpu_ids -1]

Each configuration trains HealthiVert on the synthetic test samples for 2 epochs in a fresh
process tree; the figure is the second epoch's time from train.py's "end of epoch" line (start-up,
imports and the first epoch's warm-up left out), as samples per second over all processes, median
over ``--repeats`` runs. ``--batch_size`` is per process, so N processes train N times the batch
per iteration on the same epoch. ``torchrun1`` is one process under the launcher: its overhead over
``plain``. On the CPU the processes use gloo and one thread each; with ``--gpu_ids 0`` each process
takes GPU LOCAL_RANK (NCCL).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EPOCH_LINE = re.compile(r"end of epoch 2 / 2, ([0-9.]+) s")


def command(config: str, train_args: list[str]) -> list[str]:
    """The command line of one configuration: ``plain`` or ``torchrun<N>``."""
    if config == "plain":
        return [sys.executable, str(ROOT / "train.py"), *train_args]
    match = re.fullmatch(r"torchrun(\d+)", config)
    if not match:
        raise ValueError(f"unknown configuration {config!r} (plain or torchrunN)")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, f"--nproc_per_node={match.group(1)}", str(ROOT / "train.py"), *train_args]


def epoch_seconds(output: str) -> float:
    """The second epoch's seconds from train.py's output."""
    match = EPOCH_LINE.search(output)
    if not match:
        raise RuntimeError(f"no 'end of epoch 2' line in the output:\n{output[-2000:]}")
    return float(match.group(1))


def run_once(config: str, opt: argparse.Namespace, folder: Path) -> float:
    args = ["--dataset_mode", "tests.fixtures.synthetic_vertebra", "--synthetic_samples", str(opt.samples)]
    args += ["--crop_size", str(opt.crop_size), "--gpu_ids", opt.gpu_ids, "--model", "healthivert"]
    args += ["--name", config, "--checkpoints_dir", str(folder), "--batch_size", str(opt.batch_size)]
    args += ["--num_threads", "0", "--n_epochs", "1", "--n_epochs_decay", "1", "--val_freq", "0"]
    args += ["--display_freq", "100000", "--print_freq", "100000", "--save_epoch_freq", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command(config, args), capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
    return epoch_seconds(done.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="plain,torchrun1,torchrun2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=32, help="samples per epoch")
    p.add_argument("--crop_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=2, help="per process")
    p.add_argument("--gpu_ids", default="-1", help="-1 for the CPU (gloo), 0 for GPUs (NCCL)")
    opt = p.parse_args(sys.argv[1:] if argv is None else argv)
    configs = [c.strip() for c in opt.configs.split(",") if c.strip()]
    try:
        for config in configs:
            command(config, [])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opt.repeats):  # interleaved, so load changes on a shared machine hit all alike
            for config in configs:
                times[config].append(run_once(config, opt, Path(tmp) / f"{config}_{r}"))
    device = "CPU, gloo" if opt.gpu_ids.strip() == "-1" else f"GPU {opt.gpu_ids}, NCCL"
    print(
        f"healthivert, {opt.samples} samples of {opt.crop_size} px per epoch, batch {opt.batch_size} "
        f"per process, {device}; median of {opt.repeats} (second epoch)"
    )
    base = statistics.median(times[configs[0]])
    for config in configs:
        med = statistics.median(times[config])
        runs = ", ".join(f"{t:.2f}" for t in times[config])
        print(
            f"{config:>10}: {med:7.2f} s/epoch  {opt.samples / med:7.2f} samples/s  "
            f"x{base / med:.2f} vs {configs[0]}  (runs: {runs})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

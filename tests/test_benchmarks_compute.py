"""The speed benchmarks' compute floor: FLOP counts with known answers, and both benchmarks' output."""

import torch

from benchmarks import bench_synthesis, bench_train
from benchmarks.compute_floor import count_gflops, matmul_gflops


def test_count_gflops_known_answers():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        got = count_gflops(lambda: conv(x))
    assert got["convolution"] == got["total"] == 2 * 16 * 16 * 8 * 3 * 9 / 1e9
    a, b = torch.rand(2, 4, 5), torch.rand(2, 5, 6)
    got = count_gflops(lambda: torch.bmm(a, b))
    assert got["matmul"] == got["total"] == 2 * 2 * 4 * 5 * 6 / 1e9 and got["convolution"] == 0
    # a backward pass counts too: input and weight gradients, twice the forward's FLOPs
    y = torch.rand(1, 3, 16, 16, requires_grad=True)
    got = count_gflops(lambda: conv(y).sum().backward())
    assert got["convolution"] == 3 * 2 * 16 * 16 * 8 * 3 * 9 / 1e9
    assert matmul_gflops(n=256, repeats=1) > 0


def test_bench_synthesis_prints_times_and_the_compute_floor(capsys):
    argv = ["--spacing_mm", "8", "--repeats", "1", "--threads", "1", "--batch_slices", "0", "1", "--flops"]
    assert bench_synthesis.main(argv) == 0
    out = capsys.readouterr().out
    assert "batched:" in out and "one slice:" in out and "the speed of one slice per forward pass" in out
    floors = [line for line in out.splitlines() if "compute floor" in line]
    assert len(floors) == 2  # one per mode
    # the same slices are synthesised either way, so the FLOPs per vertebra agree to within the
    # fine decoder's row window (per slice, or the union over a pass)
    gflop = [float(line.split(": ", 1)[1].split(" GFLOP per vertebra")[0]) for line in floors]
    assert all(g > 0 for g in gflop) and abs(gflop[0] - gflop[1]) <= 0.25 * max(gflop)


def test_bench_synthesis_times_the_target_alone_between_real_neighbours(capsys):
    argv = ["--spacing_mm", "8", "--repeats", "1", "--threads", "1", "--batch_slices", "0"]
    assert bench_synthesis.main(argv) == 0
    ordered = capsys.readouterr().out
    assert bench_synthesis.main([*argv, "--neighbours", "real"]) == 0
    real = capsys.readouterr().out
    assert "--neighbours real" in real and "--neighbours synthesise" in ordered

    def passes(out):
        return int(out.split(" forward passes")[0].rsplit(" ", 1)[1])

    assert (passes(ordered), passes(real)) == (3, 1)  # three steps of one batched pass, then one


def test_bench_train_prints_the_compute_floor(capsys):
    assert bench_train.main(["--configs", "32x2", "--iters", "1", "--torch_threads", "1", "--flops"]) == 0
    out = capsys.readouterr().out
    assert "GFLOP per iteration" in out and "compute floor" in out

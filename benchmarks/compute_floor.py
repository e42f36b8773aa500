"""What the arithmetic allows: FLOPs a piece of work executes, and this machine's fp32 rate.

The compute floor of a piece of work is its FLOP count over the rate of a large fp32 matrix
product at the same thread count: PyTorch's best-tuned fp32 kernel, which convolution kernels
that do the products directly (GEMM-based or direct, as PyTorch's CPU backend does for these
layers) do not outrun in practice, so no such implementation of the same arithmetic is expected
to run faster on this machine; only fewer-multiplication algorithms (Winograd, FFT) or less
arithmetic (a smaller model, fewer passes) could go under the floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_gflops(device: str = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of an n x n matrix product at the current thread count (best of ``repeats``)."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_gflops(fn: Callable[[], object]) -> dict[str, float]:
    """GFLOP that ``fn()`` executes: ``total``, ``convolution`` (forward and backward) and
    ``matmul`` (mm, bmm, addmm), by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = {str(k): v / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    return {
        "total": counter.get_total_flops() / 1e9,
        "convolution": sum(v for k, v in counts.items() if "convolution" in k),
        "matmul": sum(v for k, v in counts.items() if "mm" in k),
    }

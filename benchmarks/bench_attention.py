"""Benchmark: Grad-CAM++ seconds per vertebra and classifier training seconds per iteration (prints figures).

    python -m benchmarks.bench_attention --dataroot D --checkpoint C/cls/classifier.pth
        [--vertebrae 8] [--repeats 3] [--batch_size 32] [--gpu_ids auto|-1|0]

D is a straightened dataset root. Maps are made in memory (nothing is written) for the first
``--vertebrae`` crops, ``--repeats`` times; the median over the repeats is printed, for the
unmasked and the masked input. Training iterations use the default batch (16 windows of 128 mm)
of the classifier's own architecture.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from Attention.classifier import build_classifier, load_classifier
from Attention.grad_CAM_3d_sagittal import CamMaker, crop_heatmap
from Attention.train_classifier import augment
from data.crops import CropStore
from options.base_options import device_of, parse_gpu_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--vertebrae", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--gpu_ids", default="auto")
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    opt.gpu_ids = parse_gpu_ids(opt.gpu_ids)
    device = device_of(opt)
    model, config = load_classifier(opt.checkpoint, device)
    store = CropStore(opt.dataroot)
    keys = store.keys()[: opt.vertebrae]
    crops = [store.load(k) for k in keys]  # decoding is not timed
    print(
        f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, device {device}; "
        f"{len(crops)} vertebrae, crops {crops[0].ct.shape}, {opt.repeats} repeats"
    )
    cam = CamMaker(model, device, opt.batch_size)
    for cam_input in ("unmasked", "masked"):
        times = []
        for _ in range(opt.repeats):
            start = time.perf_counter()
            for crop in crops:
                crop_heatmap(crop, cam, config.plane, cam_input)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / len(crops))
        print(f"grad-cam++ {cam_input}: median {np.median(times):.3f} s/vertebra (runs {np.round(times, 3)})")

    net = build_classifier(config).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    side = int(round(128 / (config.spacing_mm or 1.0)))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, side, side, device=device)
    y = torch.randint(0, 2, (16,), device=device)
    times = []
    for _ in range(opt.repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(net(augment(x, gen)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = times[1:]  # the first iteration warms up
    print(f"training: median {np.median(times):.3f} s/iteration (batch 16 of {side}x{side})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Test flags: where results go, which split, how many samples."""

from __future__ import annotations

import argparse

from options.base_options import BaseOptions


class TestOptions(BaseOptions):
    is_train = False

    def initialize(self, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = super().initialize(parser)
        parser.add_argument("--results_dir", default="./results", help="where results are saved")
        parser.add_argument("--aspect_ratio", type=float, default=1.0, help="aspect ratio of result images")
        parser.add_argument("--phase", default="test", help="train | val | test")
        parser.add_argument(
            "--eval", action="store_true", help="eval mode (batchnorm and dropout) at test time"
        )
        parser.add_argument("--num_test", type=int, default=50, help="how many test samples")
        parser.add_argument(
            "--no_amp",
            action="store_true",
            help="on CUDA: no bf16 autocast / channels_last (CPU is always fp32)",
        )
        parser.set_defaults(serial_batches=True, num_threads=0, batch_size=1, no_flip=True)
        return parser

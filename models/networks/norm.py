"""Normalisation layers by name (``--norm batch | instance | none``)."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn


class Identity(nn.Module):
    def forward(self, x):
        return x


def get_norm_layer(norm_type: str = "batch") -> Callable[[int], nn.Module]:
    """A constructor ``f(channels) -> module`` for the normalisation ``norm_type`` names.

    batch: learnable affine and running statistics; instance: no affine, no running statistics
    (the pix2pix/CycleGAN convention); none: identity.
    """
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    if norm_type == "none":
        return lambda channels: Identity()
    raise ValueError(f"unknown norm {norm_type!r}; use batch | instance | none")


def uses_bias(norm_layer: Callable[[int], nn.Module]) -> bool:
    """Convolutions before an instance norm (or none) keep their bias; before batch norm they do not."""
    probe = norm_layer(1)
    return not isinstance(probe, nn.BatchNorm2d)

"""Weight initialisation; no device is hard-wired (modules move with ``.to(device)``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init


def init_weights(net: nn.Module, init_type: str = "normal", init_gain: float = 0.02) -> nn.Module:
    """Initialise conv/linear weights (normal, xavier, kaiming, orthogonal) and norm layers."""

    def init_func(m: nn.Module) -> None:
        name = type(m).__name__
        if hasattr(m, "weight") and m.weight is not None and ("Conv" in name or "Linear" in name):
            if init_type == "normal":
                init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(m.weight, gain=init_gain)
            else:
                raise ValueError(
                    f"unknown init_type {init_type!r}; use normal | xavier | kaiming | orthogonal"
                )
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias, 0.0)
        elif "BatchNorm" in name and getattr(m, "weight", None) is not None:
            init.normal_(m.weight, 1.0, init_gain)
            init.constant_(m.bias, 0.0)

    net.apply(init_func)
    return net


def init_net(
    net: nn.Module, init_type: str = "normal", init_gain: float = 0.02, device: torch.device | str = "cpu"
) -> nn.Module:
    """Initialise ``net`` and move it to ``device``."""
    init_weights(net, init_type, init_gain)
    return net.to(device)

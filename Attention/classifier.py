"""A small 2D SE-ResNet that tells fractured from normal vertebrae on straightened slices.

Why our own network and not MONAI's ``SEResNet50`` (what the reference used): MONAI is not a
dependency, and SE-ResNet-50 has about 26 M parameters, far more than a binary decision on one
vertebra needs and too slow to train on a CPU. This one is a ResNet of basic blocks with
squeeze-and-excitation: a stride-4 stem, then four stages of ``width * (1, 2, 4, 8)`` channels
(about 0.3 M parameters at the default width 16 and one block per stage; it trains in minutes on
a CPU). The last stage keeps the resolution of the third, so Grad-CAM++ maps come from a
1/16-scale feature map (8 x 8 for a 128-voxel slice, 2 mm voxels) rather than the reference's 1/32.

The architecture is described by :class:`ClassifierConfig`, saved as JSON next to the weights
(``classifier.pth`` holds a plain state dict, loadable with ``weights_only=True``);
:func:`load_classifier` rebuilds the network from the two and says clearly when they do not match.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from util.atomic import read_json
from util.checkpoint import load_checkpoint
from util.errors import input_error

log = logging.getLogger(__name__)

ARCH = "se_resnet2d"


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild the network and feed it the right slices."""

    arch: str = ARCH
    width: int = 16  # channels of the first stage; stages have width * (1, 2, 4, 8)
    blocks: tuple[int, ...] = (1, 1, 1, 1)  # SE basic blocks per stage
    num_classes: int = 2  # class 1 = fractured
    plane: str = "sagittal"
    spacing_mm: float | None = None  # voxel size of the crops it was trained on
    extra: dict = field(default_factory=dict)  # training options and metrics, for the record

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_json(cls, d: dict) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "blocks" in values:
            values["blocks"] = tuple(int(b) for b in values["blocks"])
        return cls(**values)


class SqueezeExcite(nn.Module):
    """Channel gating from global average pooling (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class SEBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-SE plus a (projected) shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            SqueezeExcite(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class SEResNet2d(nn.Module):
    """Input (B, 1, H, W) in [0, 1]; output (B, num_classes) logits. Any H, W divisible by 16."""

    STRIDES = (1, 2, 2, 1)

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if len(config.blocks) != len(self.STRIDES):
            raise ValueError(f"blocks needs {len(self.STRIDES)} entries, got {config.blocks}")
        w = config.width
        self.stem = nn.Sequential(
            nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, channels = [], w
        for i, (n_blocks, stride) in enumerate(zip(config.blocks, self.STRIDES, strict=True)):
            out = w * 2**i
            layers = [SEBasicBlock(channels, out, stride)]
            layers += [SEBasicBlock(out, out) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, config.num_classes)
        )

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose activations Grad-CAM++ weighs: the last block."""
        return self.stages[-1][-1]

    @property
    def cam_stride(self) -> int:
        """Input pixels per cell of :attr:`cam_layer`: cell ``i`` is centred on pixel ``cam_stride * i``.

        Every downsampling layer (3x3 convolutions and max pooling with padding 1, 1x1 shortcuts
        with padding 0, all of stride 2) centres its output ``j`` on its input ``2 j``; the cells
        therefore sit at the top-left corners of their ``cam_stride`` blocks, not at the blocks'
        centres, and there are ``ceil(H / cam_stride)`` of them."""
        stride = 4  # the stem's convolution and max pooling
        for s in self.STRIDES:
            stride *= s
        return stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_classifier(config: ClassifierConfig) -> SEResNet2d:
    if config.arch != ARCH:
        raise ValueError(f"unknown classifier architecture {config.arch!r}; this version builds {ARCH!r}")
    return SEResNet2d(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def config_path(checkpoint: str | os.PathLike) -> Path:
    """The JSON beside a checkpoint: ``classifier.pth`` -> ``classifier.json``."""
    return Path(checkpoint).with_suffix(".json")


def load_classifier(
    checkpoint: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[SEResNet2d, ClassifierConfig]:
    """Rebuild the classifier saved at ``checkpoint`` (weights) and its JSON (architecture).

    Raises:
        InputError: the checkpoint is missing or unreadable, its JSON names another architecture,
            or the weights do not fit the network the JSON describes.
    """
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint, map_location="cpu")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise input_error(checkpoint, "not a classifier state dict (expected tensors by name)")
    cfg_file = config_path(checkpoint)
    if cfg_file.exists():
        config = ClassifierConfig.from_json(read_json(cfg_file, "classifier options"))
    else:
        log.warning("%s not found; assuming the default classifier architecture", cfg_file)
        config = ClassifierConfig()
    try:
        model = build_classifier(config)
    except ValueError as exc:
        raise input_error(cfg_file, str(exc)) from exc
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise input_error(
            checkpoint,
            f"weights of another architecture than {config.arch} width {config.width} blocks "
            f"{list(config.blocks)} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of another shape, e.g. {first!r})",
        )
    model.load_state_dict(state)
    return model.to(device).eval(), config


__all__ = [
    "ARCH",
    "ClassifierConfig",
    "SEResNet2d",
    "build_classifier",
    "config_path",
    "load_classifier",
    "parameter_count",
]

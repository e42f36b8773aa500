"""Mask-conditioned CT generation data: 2D slices (or patches) of label maps and their CT.

Reads ``<root>/raw/<case>/<case>.nii.gz`` (CT in HU) with ``<case>_msk.nii.gz`` (any integer
labels, e.g. 1 heart, 2 aorta, 3 pulmonary artery), reoriented to the canonical axis order and
resampled to ``--spacing_mm`` through the affine; slices are taken along ``--slice_axis`` (0 axial,
1 coronal, 2 sagittal in that order).

Label subset (``--labels 0,1,3`` or ``--config FILE.json`` with ``"LABELS": [0, 1, 3]``): labels not
in the list become background (0) first; then channel ``k`` is 1 where the label equals
``labels[k]``. So with 0 in the list its channel holds the background and every unselected label;
without 0 the background has no channel (all channels 0 there). See :func:`one_hot_labels`.

CT intensities: HU clipped to ``[--hu_min, --hu_max]`` (default -1024..2048) and mapped to [-1, 1]
(:mod:`data.intensity`). Held-out slices: per case, the last ``--holdout_fraction`` of the slices
that hold a selected label (one block) are used when ``--phase`` is not ``train``; training uses
the others except those within ``--holdout_gap_mm`` of the block, so no held-out slice has a
near-copy among the training slices.

Training augmentation keeps mask and image aligned: random flips of both in-plane axes, a small
random affine (rotation, scale, shift; nearest for labels, linear for CT), and a small random
intensity scale/shift of the CT (``--intensity_aug``); ``--no_augment`` switches all off.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from data.base_dataset import BaseDataset
from data.intensity import CT_WINDOW_HU, ct_to_unit
from data.layout import list_patients, raw_case
from data.nifti_io import Volume, check_same_grid, load_ct, read_labels, reorient, resample
from util.atomic import read_json
from util.errors import input_error

log = logging.getLogger(__name__)


def parse_labels(spec: str | None, config: str | os.PathLike | None = None) -> list[int]:
    """The label subset from ``--labels 0,1,3`` or a JSON config with ``"LABELS": [...]`` (not both)."""
    if config and spec:
        raise input_error(config, f"give --labels ({spec}) or --config, not both")
    if config:
        data = read_json(config, "mask2ct config")
        values = data.get("LABELS") if isinstance(data, dict) else None
        if not isinstance(values, list) or not values:
            raise input_error(config, 'expected a JSON object with a non-empty "LABELS" list')
    elif spec:
        try:
            values = [int(s) for s in str(spec).split(",") if s.strip()]
        except ValueError:
            raise input_error(None, f"--labels must be comma-separated integers, got {spec!r}") from None
    else:
        raise input_error(None, "give the label subset: --labels 0,1,3 or --config FILE.json with LABELS")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in values) or len(set(values)) != len(
        values
    ):
        raise input_error(config, f"labels must be distinct non-negative integers, got {values}")
    return list(values)


def one_hot_labels(labels: np.ndarray, subset: list[int]) -> np.ndarray:
    """(len(subset), ...) float32 one-hot of ``labels`` after unselected labels became 0."""
    labels = np.asarray(labels)
    kept = np.where(np.isin(labels, subset), labels, 0)
    return np.stack([(kept == v) for v in subset]).astype(np.float32)


def load_labels(path: str | os.PathLike) -> Volume:
    """An integer label map of any label set (not only vertebrae), ids kept exactly
    (:func:`data.nifti_io.read_labels`: never wrapped to int16 nor rounded through float32)."""
    return read_labels(path)


def load_pair(ct_path: Path, mask_path: Path, spacing_mm: float) -> tuple[np.ndarray, np.ndarray, Volume]:
    """CT (HU) and labels on one canonical grid at ``spacing_mm``; also the canonical CT volume."""
    ct, mask = load_ct(ct_path), load_labels(mask_path)
    check_same_grid(ct, mask)
    ct, mask = reorient(ct), reorient(mask)
    ct, mask = resample(ct, spacing_mm, order=1), resample(mask, spacing_mm, order=0)
    return ct.array.astype(np.float32), mask.array, ct


def augment_pair(
    label: np.ndarray,
    image: np.ndarray,
    rng: np.random.Generator,
    max_rot_deg: float = 10.0,
    max_scale: float = 0.1,
    max_shift: float = 0.05,
    intensity: float = 0.03,
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips (unless ``flip`` is False), small affine (about the centre) and intensity change,
    applied to both alike.

    ``label`` is warped with nearest neighbour, ``image`` (in [-1, 1]) linearly; outside -> 0 / -1.
    """
    for axis in (0, 1):
        if rng.random() < 0.5 and flip:
            label, image = np.flip(label, axis), np.flip(image, axis)
    angle = np.deg2rad(rng.uniform(-max_rot_deg, max_rot_deg))
    scale = 1.0 + rng.uniform(-max_scale, max_scale)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = (np.array(label.shape) - 1) / 2.0
    shift = rng.uniform(-max_shift, max_shift, 2) * np.array(label.shape)
    offset = centre - matrix @ centre + shift
    label = ndimage.affine_transform(label, matrix, offset, order=0, mode="constant", cval=0)
    image = ndimage.affine_transform(image, matrix, offset, order=1, mode="constant", cval=-1.0)
    if intensity > 0:
        gain = 1.0 + rng.uniform(-intensity, intensity)
        bias = rng.uniform(-intensity, intensity)
        image = np.clip((image + 1.0) * gain - 1.0 + bias, -1.0, 1.0)
    return label, image.astype(np.float32)


def crop_around(
    arrays: list[np.ndarray], size: int, pad_values: list[float], centre: tuple[int, int] | None
) -> list[np.ndarray]:
    """Pad 2D arrays to at least ``size`` and crop ``size`` x ``size`` around ``centre`` (default: middle)."""
    h, w = arrays[0].shape
    ph, pw = max(0, size - h), max(0, size - w)
    pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    arrays = [np.pad(a, pads, constant_values=v) for a, v in zip(arrays, pad_values, strict=True)]
    h, w = arrays[0].shape
    cy, cx = (h // 2, w // 2) if centre is None else (centre[0] + pads[0][0], centre[1] + pads[1][0])
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    return [a[y0 : y0 + size, x0 : x0 + size] for a in arrays]


class Mask2ctDataset(BaseDataset):
    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        g = parser.add_argument_group("mask2ct data")
        g.add_argument("--labels", default=None, help="label subset as one-hot channels, e.g. 0,1,3")
        g.add_argument("--config", default=None, help='JSON file with "LABELS": [...] (instead of --labels)')
        g.add_argument(
            "--slice_axis", type=int, default=0, choices=(0, 1, 2), help="0 axial, 1 coronal, 2 sagittal"
        )
        g.add_argument("--hu_min", type=float, default=CT_WINDOW_HU[0], help="CT window low end (HU) -> -1")
        g.add_argument("--hu_max", type=float, default=CT_WINDOW_HU[1], help="CT window high end (HU) -> +1")
        g.add_argument("--holdout_fraction", type=float, default=0.2, help="last slices per case held out")
        g.add_argument(
            "--holdout_gap_mm",
            type=float,
            default=5.0,
            help="slices this close to the held-out block are used by neither side",
        )
        g.add_argument("--no_augment", action="store_true", help="no flips, affine or intensity augmentation")
        g.add_argument("--intensity_aug", type=float, default=0.03, help="CT gain/offset jitter (unit range)")
        parser.set_defaults(spacing_mm=1.5)
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        self.subset = parse_labels(getattr(opt, "labels", None), getattr(opt, "config", None))
        self.train = getattr(opt, "phase", "train") == "train"
        self.augment = self.train and not getattr(opt, "no_augment", False)
        self.size = int(opt.crop_size)
        self.slices: list[tuple[int, int]] = []  # (case index, slice index)
        self.volumes: list[tuple[np.ndarray, np.ndarray]] = []  # (labels, CT in [-1, 1]) slice-first
        self.paths: list[str] = []
        selected = [v for v in self.subset if v != 0]
        for pid in list_patients(opt.dataroot):
            case = raw_case(opt.dataroot, pid)
            if case.ct is None:
                raise input_error(case.folder, f"no CT {pid}.nii.gz next to the mask")
            ct, labels, _ = load_pair(case.ct, case.mask, opt.spacing_mm)
            ct = np.moveaxis(ct_to_unit(ct, opt.hu_min, opt.hu_max), opt.slice_axis, 0)
            labels = np.moveaxis(labels, opt.slice_axis, 0)
            present = np.isin(labels, selected).any(axis=(1, 2)) if selected else np.ones(len(labels), bool)
            idx = np.flatnonzero(present)
            if idx.size == 0:
                log.warning("%s: none of labels %s present; case skipped", case.mask, self.subset)
                continue
            n_hold = int(round(len(idx) * opt.holdout_fraction))
            held = idx[len(idx) - n_hold :]
            if self.train:
                idx = idx[: len(idx) - n_hold]
                if held.size:  # a guard band: no training slice within the gap of a held-out one
                    gap_mm = getattr(opt, "holdout_gap_mm", 5.0)
                    idx = idx[(held[0] - idx) * opt.spacing_mm > gap_mm]
            else:
                idx = held
            self.slices += [(len(self.volumes), int(i)) for i in idx]
            self.volumes.append((np.ascontiguousarray(labels), np.ascontiguousarray(ct)))
            self.paths.append(str(case.ct))
        if not self.slices:
            raise input_error(
                Path(opt.dataroot) / "raw",
                f"no {'training' if self.train else 'held-out'} slices with labels {self.subset}",
            )

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> dict:
        case, k = self.slices[index]
        labels, ct = self.volumes[case][0][k], self.volumes[case][1][k]
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()) if self.train else index)
        if self.augment:
            labels, ct = augment_pair(
                labels,
                ct,
                rng,
                intensity=self.opt.intensity_aug,
                flip=not getattr(self.opt, "no_flip", False),
            )
        centre = None
        if self.train:
            fg = np.argwhere(np.isin(labels, [v for v in self.subset if v != 0]))
            if len(fg):
                centre = tuple(int(c) for c in fg[rng.integers(len(fg))])
        labels, ct = crop_around([labels, ct], self.size, [0, -1.0], centre)
        return {
            "A": torch.from_numpy(one_hot_labels(labels, self.subset)),
            "B": torch.from_numpy(np.ascontiguousarray(ct, dtype=np.float32))[None],
            "A_paths": f"{self.paths[case]}#slice{k}",
        }

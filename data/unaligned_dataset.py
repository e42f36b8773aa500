"""Unpaired 2D slices of two domains (A = MR, B = CT by default) for CycleGAN.

``<dataroot>/<phase>A/*.nii.gz`` and ``<dataroot>/<phase>B/*.nii.gz`` (``trainA``/``trainB`` when
training), optional ``maskA/`` and ``maskB/`` with the same file names. Every volume is reoriented to
the canonical axis order and resampled to ``--spacing_mm`` through its affine, normalised per
modality (:mod:`data.intensity`: CT HU window ``--hu_min..--hu_max`` -> [-1, 1]; MR by its own 0.5
and 99.5 percentiles -> [-1, 1]) and sliced along ``--slice_axis``; slices whose shape mask covers
less than 1 % of the slice are skipped.

Shapes (targets of the shape extractor): with ``--shape_source masks`` (or ``auto`` when both
``maskA/`` and ``maskB/`` exist) the mask's foreground (any label > 0); with ``body`` (or ``auto``
without masks) body masks from thresholding and hole filling (:mod:`data.body_masks`).

An item holds ``A``, ``B`` (1 x crop x crop in [-1, 1]), ``shape_A``, ``shape_B`` (1 x crop x crop,
0/1) and the paths; B's slice is drawn at random (unpaired) unless ``--serial_batches``. Slices are
padded to at least ``--crop_size`` and cropped (randomly when training), flipped unless ``--no_flip``.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import torch

from data.base_dataset import BaseDataset
from data.body_masks import body_mask
from data.intensity import CT_WINDOW_HU, to_unit
from data.mask2ct_dataset import crop_around, load_labels
from data.nifti_io import check_same_grid, load_ct, reorient, resample
from util.errors import input_error

log = logging.getLogger(__name__)
MIN_SHAPE_FRACTION = 0.01


def volume_files(folder: Path) -> list[Path]:
    """NIfTI volumes in ``folder``, sorted; an error naming the folder if there are none."""
    if not folder.is_dir():
        raise input_error(folder, "folder not found (expected trainA/ with MR and trainB/ with CT volumes)")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not files:
        raise input_error(folder, "no .nii.gz volumes")
    return files


def load_domain_volume(
    path: Path, modality: str, spacing_mm: float, hu_window: tuple[float, float], mask_path: Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """(image in [-1, 1], shape 0/1) on the canonical grid at ``spacing_mm``."""
    original = load_ct(path)
    volume = resample(reorient(original), spacing_mm, order=1)
    if mask_path is not None:
        labels = load_labels(mask_path)
        check_same_grid(original, labels)
        shape = resample(reorient(labels), spacing_mm, order=0).array > 0
    else:
        shape = body_mask(volume.array, modality)
    return to_unit(volume.array, modality, hu_window), shape.astype(np.float32)


class UnalignedDataset(BaseDataset):
    @staticmethod
    def modify_commandline_options(
        parser: argparse.ArgumentParser, is_train: bool
    ) -> argparse.ArgumentParser:
        g = parser.add_argument_group("unaligned data")
        g.add_argument("--modality_A", default="mr", choices=("mr", "ct"), help="modality of domain A")
        g.add_argument("--modality_B", default="ct", choices=("mr", "ct"), help="modality of domain B")
        g.add_argument(
            "--slice_axis", type=int, default=0, choices=(0, 1, 2), help="0 axial, 1 coronal, 2 sagittal"
        )
        g.add_argument("--hu_min", type=float, default=CT_WINDOW_HU[0], help="CT window low end (HU) -> -1")
        g.add_argument("--hu_max", type=float, default=CT_WINDOW_HU[1], help="CT window high end (HU) -> +1")
        g.add_argument(
            "--shape_source",
            default="auto",
            choices=("auto", "masks", "body"),
            help="shape targets: masks (foreground), body (thresholding), auto (masks if maskA/ maskB/)",
        )
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        root = Path(opt.dataroot)
        phase = getattr(opt, "phase", "train")
        self.train = phase == "train"
        self.size = int(opt.crop_size)
        use_masks = opt.shape_source == "masks" or (
            opt.shape_source == "auto" and (root / "maskA").is_dir() and (root / "maskB").is_dir()
        )
        hu_window = (opt.hu_min, opt.hu_max)
        self.domains: dict[str, list[tuple[np.ndarray, np.ndarray, int, str]]] = {}
        for side in ("A", "B"):
            slices = []
            for path in volume_files(root / f"{phase}{side}"):
                mask_path = root / f"mask{side}" / path.name if use_masks else None
                if mask_path is not None and not mask_path.is_file():
                    raise input_error(
                        mask_path, f"mask for {path.name} missing (--shape_source body to threshold)"
                    )
                image, shape = load_domain_volume(
                    path, getattr(opt, f"modality_{side}"), opt.spacing_mm, hu_window, mask_path
                )
                image, shape = np.moveaxis(image, opt.slice_axis, 0), np.moveaxis(shape, opt.slice_axis, 0)
                keep = np.flatnonzero(shape.mean(axis=(1, 2)) >= MIN_SHAPE_FRACTION)
                if keep.size == 0:
                    log.warning("%s: no slice with a shape; volume skipped", path)
                slices += [(image[k], shape[k], int(k), str(path)) for k in keep]
            if not slices:
                raise input_error(root / f"{phase}{side}", "no usable slices (every shape mask is empty)")
            self.domains[side] = slices
        log.info("unaligned slices: %d A, %d B", len(self.domains["A"]), len(self.domains["B"]))

    def __len__(self) -> int:
        return max(len(self.domains["A"]), len(self.domains["B"]))

    def _sample(self, side: str, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        image, shape, k, path = self.domains[side][index]
        centre = None
        if self.train:
            h, w = image.shape
            centre = (random.randrange(h), random.randrange(w))
            if not self.opt.no_flip:
                for axis in (0, 1):
                    if random.random() < 0.5:
                        image, shape = np.flip(image, axis), np.flip(shape, axis)
        image, shape = crop_around([image, shape], self.size, [-1.0, 0.0], centre)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]  # noqa: E731
        return as_tensor(image), as_tensor(shape), f"{path}#slice{k}"

    def __getitem__(self, index: int) -> dict:
        n_a, n_b = len(self.domains["A"]), len(self.domains["B"])
        index_b = index % n_b if self.opt.serial_batches or not self.train else random.randrange(n_b)
        a, shape_a, path_a = self._sample("A", index % n_a)
        b, shape_b, path_b = self._sample("B", index_b)
        return {"A": a, "B": b, "shape_A": shape_a, "shape_B": shape_b, "A_paths": path_a, "B_paths": path_b}

"""Which vertebrae the classifier learns from, and their slices, decoded once and kept in memory.

A vertebra of the split is *fractured* (target 1) when its Genant grade is at least
``min_grade`` and *normal* (target 0) when its grade is 0; grades in between are left out.
Crops are read through :class:`data.crops.CropStore`; :class:`SliceBank` keeps the chosen
slices of every vertebra as one uint8 array, so an epoch costs no decoding.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from Attention.slices import take_slices, target_centre, target_slices, window_slices
from data.base_dataset import read_split, split_key
from data.crops import CropStore, crop_key
from util.errors import input_error

log = logging.getLogger(__name__)


def binary_targets(grades: dict[str, int], min_grade: int) -> dict[str, int]:
    """{key: 1 if grade >= min_grade, 0 if grade == 0}; other grades are left out."""
    return {k: int(g >= min_grade) for k, g in grades.items() if g == 0 or g >= min_grade}


def split_examples(
    store: CropStore, split_file: str | os.PathLike, phase: str, min_grade: int
) -> dict[str, int]:
    """The vertebrae of split ``phase`` the classifier uses, {crop key: target}.

    Raises:
        InputError: the split is empty or missing, one of its vertebrae has no crop, or none of
            its vertebrae is normal or fractured by ``min_grade``.
    """
    grades = read_split(split_file, phase)
    missing = [k for k in grades if crop_key(*split_key(k)) not in store]
    label_only = [k for k in missing if store.paths(crop_key(*split_key(k)))[1].exists()]
    if label_only:
        raise input_error(
            store.paths(crop_key(*split_key(label_only[0])))[0],
            f"split {phase!r}: {len(label_only)} vertebrae have a label crop but no CT crop in "
            f"{store.folder} (straightened with --labels_only?); the classifier learns from CT: "
            "straighten them with their CT",
        )
    if missing:
        raise input_error(
            split_file,
            f"split {phase!r}: {len(missing)} vertebrae have no straightened crop in "
            f"{store.folder} (first: {missing[0]}); straighten them or remove them from the split",
        )
    targets = binary_targets(grades, min_grade)
    if not targets:
        raise input_error(split_file, f"split {phase!r} has no vertebra of grade 0 or >= {min_grade}")
    return {crop_key(*split_key(k)): t for k, t in targets.items()}


def patients_shared(split_file: str | os.PathLike, phase: str, other: str = "train") -> list[str]:
    """Patients with vertebrae in both split ``phase`` and split ``other`` (sorted)."""
    data = read_split(split_file)

    def pids(name: str) -> set[str]:
        return {split_key(k)[0] for k in data.get(name) or {}}

    return sorted(pids(phase) & pids(other))


@dataclass
class SliceBank:
    """Slices of many vertebrae: ``images`` (N, H, W), ``targets`` (N,), ``owner`` (N,) indexes ``keys``."""

    images: np.ndarray
    targets: np.ndarray
    owner: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def build(
        cls,
        store: CropStore,
        examples: dict[str, int],
        plane: str,
        central_fraction: float,
        window_mm: float | None = None,
    ) -> SliceBank:
        """Slices through the central ``central_fraction`` of each target; with ``window_mm``, only a
        square window of that side (mm) centred on the target (the network needs no more to decide)."""
        images, targets, owner, keys = [], [], [], []
        for key, target in sorted(examples.items()):
            crop = store.load(key)
            idx = target_slices(crop.label, crop.vid, plane, central_fraction)
            if idx.size == 0:
                raise input_error(store.paths(key)[1], f"vertebra {crop.vid} is not in its own crop")
            stack = take_slices(crop.ct, idx, plane)
            if window_mm:
                col = 1 if plane == "sagittal" else 2
                centre = target_centre(crop.label, crop.vid)
                size = np.round(window_mm / crop.spacing_mm[[0, col]]).astype(int)
                if size.min() < 1:
                    spacing = " x ".join(f"{v:g}" for v in crop.spacing_mm[[0, col]])
                    problem = f"--window_mm {window_mm:g} is under one voxel ({spacing} mm)"
                    raise input_error(store.paths(key)[0], problem)
                rows, cols = window_slices(stack.shape[1:], (centre[0], centre[col]), tuple(size))
                stack = stack[:, rows, cols]
            if images and stack.shape[1:] != images[0].shape[1:]:
                raise input_error(
                    store.paths(key)[0],
                    f"{plane} slices of {stack.shape[1:]} differ from {images[0].shape[1:]} of other crops",
                )
            images.append(stack)
            targets.append(np.full(len(idx), target, dtype=np.int64))
            owner.append(np.full(len(idx), len(keys), dtype=np.int64))
            keys.append(key)
        return cls(np.concatenate(images), np.concatenate(targets), np.concatenate(owner), keys)

    def class_balanced_weights(self) -> np.ndarray:
        """Per-slice sampling weights that give both classes the same total weight."""
        counts = np.bincount(self.targets, minlength=2).astype(np.float64)
        return 1.0 / counts[self.targets]

    def vertebra_scores(self, slice_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets, mean score over each vertebra's slices), one entry per vertebra."""
        n = len(self.keys)
        sums = np.bincount(self.owner, weights=slice_scores, minlength=n)
        counts = np.bincount(self.owner, minlength=n)
        targets = np.zeros(n, dtype=np.int64)
        targets[self.owner] = self.targets
        return targets, sums / np.maximum(counts, 1)


def binary_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """ROC AUC, sensitivity and specificity (at ``threshold``) of scores for target 1; NaN when undefined."""
    targets = np.asarray(targets).astype(bool)
    predicted = np.asarray(scores) >= threshold
    pos, neg = targets.sum(), (~targets).sum()
    auc = float(roc_auc_score(targets, scores)) if pos and neg else float("nan")
    sens = float((predicted & targets).sum() / pos) if pos else float("nan")
    spec = float((~predicted & ~targets).sum() / neg) if neg else float("nan")
    return {
        "auc": auc,
        "sensitivity": sens,
        "specificity": spec,
        "positives": int(pos),
        "negatives": int(neg),
    }


__all__ = ["SliceBank", "binary_metrics", "binary_targets", "patients_shared", "split_examples"]

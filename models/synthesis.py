"""Iterative 3D synthesis of one vertebra, all of its slices at once (REFERENCE.md section 7), no I/O.

A crop's slices through the target (every slice of the target's extent along the plane's slice
axis, not only the central 80 %) form a stack ``(N, H, W)``: CT (uint8 0-255, the values the
model was trained on, so each step's output is rounded to them), labels (VerSe ids) and
attention map ([0, 1]). Three steps change the stack in turn:

1. the upper neighbour is replaced by its pseudo-healthy version, on the slices where it has at
   least ``min_area_px`` pixels;
2. the lower neighbour, on the output of step 1;
3. the target, on the output of step 2, on every slice where it is present (fragments smaller
   than ``min_component_px`` ignored).

Each step builds the squeezed samples of all its slices (:func:`data.vertebra_sample.build_sample`)
and calls ``synthesise`` on them in batches of ``batch_slices`` (0 = all in one forward pass;
1 = the reference's one slice per pass). ``synthesise`` is the model's
``HealthiVertModel.synthesise``: it returns the composite CT in [-1, 1], the fine segmentation
probability in the composite frame, and the inserted ``rows``. The labels and the attention map
are moved by the same composite (:func:`models.composite.compose`): the synthesised vertebra is
labelled where its probability exceeds 0.5 inside the inserted rows, the map is 0 there (a
vertebra synthesised healthy draws no fracture attention), and the content above and below moves
with the CT. Neighbours come from the labels present (:func:`data.label_schemes.neighbours`), so
T13, L6 and missing levels are handled; a neighbour cut by the scan's edge is left as it is.
With ``neighbours="real"`` steps 1 and 2 are skipped: the target is synthesised once, between
its real neighbours (not the reference's order; closer to the truth on the phantom, and what the
demo uses: README).

:func:`fuse_planes` combines a sagittal and a coronal result (2.5D): mean CT, and the target where
the mean of the two target probabilities exceeds 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from data.label_schemes import is_vertebra, neighbours
from data.vertebra_sample import (
    build_sample,
    clean_mask,
    pad_columns,
    slice_axis,
    slice_range,
    slice_ratio,
    target_extent,
)
from models.composite import compose

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
SynthesiseFn = Callable[[Batch], dict[str, torch.Tensor]]
# Reference thresholds at 1 mm (REFERENCE.md appendix B), as areas so other voxel sizes keep them.
MIN_NEIGHBOUR_AREA_MM2 = 200.0
MIN_COMPONENT_AREA_MM2 = 50.0


@dataclass(frozen=True)
class SynthesisSettings:
    """How a crop is synthesised.

    Args:
        hole_rows: rows of the hole (``mask_height_mm`` through the row spacing).
        margin_rows: a vertebra taller than the hole gets a hole of its height plus this (as in
            training, ``--hole_margin_mm``).
        min_area_px: a neighbour is synthesised on a slice where it has at least this many pixels.
        min_component_px: components of the step's vertebra smaller than this are ignored.
        batch_slices: slices per forward pass (0 = all slices of a step in one pass).
        width: image width the model takes (coronal slices are padded to it; ``None`` = as cut).
        row_spacing_mm: row spacing, passed to the model in the batch.
    """

    hole_rows: int
    margin_rows: int = 0
    min_area_px: float = MIN_NEIGHBOUR_AREA_MM2
    min_component_px: float = MIN_COMPONENT_AREA_MM2
    batch_slices: int = 0
    width: int | None = None
    row_spacing_mm: float = 1.0


@dataclass
class SliceStack:
    """Slices through the target, ``(N, H, W)`` each; ``ratio`` ``(N,)`` (0 = mid-plane)."""

    ct: np.ndarray  # uint8, 0-255
    label: np.ndarray  # uint8 VerSe ids
    cam: np.ndarray  # float32, [0, 1]
    ratio: np.ndarray  # float32
    index: np.ndarray  # int64 slice index in the crop


@dataclass
class CropSynthesis:
    """The result on the crop's grid: CT (float 0-255), labels, target probability, what was done."""

    ct: np.ndarray
    label: np.ndarray
    target_prob: np.ndarray
    slices: dict[str, np.ndarray]  # plane -> the slices through the target along its slice axis
    steps: dict[int, int] = field(default_factory=dict)  # vertebra id -> slices synthesised
    forward_passes: int = 0


# how a target's neighbours enter its synthesis: each replaced by its own pseudo-healthy version
# first (the reference's order), or left as the scan has them
NEIGHBOUR_MODES = ("synthesise", "real")


def step_order(vid: int, present, keep=(), neighbours_mode: str = "synthesise") -> list[int]:
    """Vertebra ids to synthesise in turn: upper neighbour, lower neighbour (those present), target.

    A neighbour in ``keep`` (one cut by the scan's edge) stays as it is: its pseudo-healthy
    version would be a whole body drawn where the scan holds a part, and would push the target
    by the rows it adds. With ``neighbours_mode="real"`` every neighbour stays as it is. A target
    that is not a vertebra id (no anatomical order) is synthesised alone.
    """
    if neighbours_mode not in NEIGHBOUR_MODES:
        raise ValueError(f"neighbours_mode must be one of {NEIGHBOUR_MODES}, got {neighbours_mode!r}")
    if not is_vertebra(vid) or neighbours_mode == "real":
        return [int(vid)]
    upper, lower = neighbours(vid, present)
    return [v for v in (upper, lower) if v is not None and v not in set(keep)] + [int(vid)]


# On the CPU a forward pass over many large slices runs slower per slice than a small one (its
# activations leave the caches): at 1 mm (256 x 256 slices, one thread) one slice per pass took
# 132 CPU s per vertebra, 8 slices 144 s and all 56 slices 172 s; at 2 mm (128 x 128) all slices in
# one pass were faster than one at a time. So the CPU batches about this many pixels per pass.
CPU_BATCH_PIXELS = 2**16


def auto_batch_slices(device_type: str, slice_pixels: int) -> int:
    """Slices per forward pass by default: 0 (all of a step) on an accelerator; on the CPU as many
    as fit :data:`CPU_BATCH_PIXELS` (at least one)."""
    if device_type != "cpu":
        return 0
    return max(1, CPU_BATCH_PIXELS // max(1, int(slice_pixels)))


def _chunks(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(s, min(s + size, n)) for s in range(0, n, max(size, 1))]


def _as_batch(sample: dict[str, np.ndarray], ratio: np.ndarray, index: np.ndarray, spacing: float) -> Batch:
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}
    n = len(ratio)
    batch["slice_ratio"] = torch.from_numpy(ratio.astype(np.float32).reshape(n, 1))
    batch["row_spacing_mm"] = torch.full((n, 1), float(spacing), dtype=torch.float32)
    batch["slice_index"] = torch.from_numpy(index.astype(np.int64).reshape(n, 1))
    return batch


def synthesis_step(
    stack: SliceStack, vid: int, synthesise: SynthesiseFn, settings: SynthesisSettings, min_area_px: float
) -> tuple[SliceStack, np.ndarray | None, int, int]:
    """Replace vertebra ``vid`` by its pseudo-healthy version on every slice where it is large enough.

    Returns ``(new stack, probability of ``vid`` (N, H, W) or None, slices done, forward passes)``:
    the fine segmentation in the composite frame on the slices synthesised, the input's label of
    ``vid`` (0 or 1) on the others, which are left unchanged (``vid`` absent, smaller than
    ``min_area_px``, or only fragments under ``settings.min_component_px``). ``None`` when no
    slice was synthesised.
    """
    area = (stack.label == vid).sum(axis=(1, 2))
    candidates = np.flatnonzero(area >= max(min_area_px, 1))
    if candidates.size:
        cleaned = clean_mask(stack.label[candidates] == vid, settings.min_component_px)
        x1, x2 = target_extent(cleaned)
        candidates = candidates[x2 > x1]
    if candidates.size == 0:
        return stack, None, 0, 0
    present = [int(v) for v in np.unique(stack.label[candidates]) if v not in (0, vid)]
    sample = build_sample(
        stack.ct[candidates],
        stack.label[candidates],
        vid,
        settings.hole_rows,
        present,
        stack.cam[candidates],
        margin_rows=settings.margin_rows,
        min_component_px=settings.min_component_px,
    )
    batch = _as_batch(sample, stack.ratio[candidates], stack.index[candidates], settings.row_spacing_mm)
    labels = torch.from_numpy(np.where(stack.label[candidates] == vid, 0, stack.label[candidates]))[:, None]
    cams = torch.from_numpy(stack.cam[candidates])[:, None]
    new_ct, new_label, new_cam, prob = [], [], [], []
    passes = 0
    for part in _chunks(len(candidates), settings.batch_slices):
        out = synthesise({k: v[part] for k, v in batch.items()})
        passes += 1
        ct = out["ct"].detach().float().cpu()
        seg = out["seg"].detach().float().cpu()
        rows = out["rows"].detach().cpu().reshape(-1)
        x1, x2 = batch["x1"][part].reshape(-1), batch["x2"][part].reshape(-1)
        generated = torch.where(seg > 0.5, vid, 0).to(labels.dtype)
        new_ct.append(ct)
        new_label.append(compose(generated, labels[part], x1, x2, rows, 0))
        new_cam.append(compose(torch.zeros_like(cams[part]), cams[part], x1, x2, rows, 0))
        prob.append(compose(seg, torch.zeros_like(seg), x1, x2, rows, 0))
    ct_new = stack.ct.copy()
    label_new = stack.label.copy()
    cam_new = stack.cam.copy()
    prob_full = (stack.label == vid).astype(np.float32)
    ct_new[candidates] = to_uint8((torch.cat(new_ct)[:, 0].numpy() + 1.0) * 127.5)
    label_new[candidates] = torch.cat(new_label)[:, 0].numpy().astype(stack.label.dtype)
    cam_new[candidates] = torch.cat(new_cam)[:, 0].numpy()
    prob_full[candidates] = torch.cat(prob)[:, 0].numpy()
    new = replace(stack, ct=ct_new, label=label_new, cam=cam_new.astype(np.float32))
    return new, prob_full, int(candidates.size), passes


def cut_stack(
    ct: np.ndarray, label: np.ndarray, cam: np.ndarray | None, vid: int, plane: str, width: int | None
) -> tuple[SliceStack, tuple[int, int]]:
    """The stack of every slice through the target's extent, padded to ``width`` columns.

    Returns the stack and the columns ``[c0, c1)`` that hold the crop's data.
    """
    slices, centre, n = slice_range(label, vid, plane, fraction=1.0)
    cam = np.zeros(ct.shape, np.float32) if cam is None else cam
    parts = [_stack_view(np.asarray(v), plane)[slices] for v in (ct, label, cam)]
    cols = (0, parts[0].shape[-1])
    if width is not None and width != cols[1]:
        if width < cols[1]:
            raise ValueError(f"{plane} slices are {cols[1]} columns wide; the model takes only {width}")
        padded = [pad_columns(p, width, 0) for p in parts]
        parts = [p[0] for p in padded]
        cols = padded[0][1:]
    stack = SliceStack(
        ct=to_uint8(parts[0]),
        label=parts[1].astype(np.uint8),
        cam=parts[2].astype(np.float32),
        ratio=slice_ratio(slices, centre, n).astype(np.float32),
        index=slices,
    )
    return stack, cols


def _stack_view(volume: np.ndarray, plane: str) -> np.ndarray:
    """The crop ``(H, AP, LR)`` seen as a stack of ``plane`` slices ``(N, H, W)`` (a view)."""
    return np.moveaxis(volume, slice_axis(plane), 0)


def _put_back(volume: np.ndarray, stack_part: np.ndarray, slices: np.ndarray, plane: str) -> None:
    _stack_view(volume, plane)[slices] = stack_part


def synthesise_crop(
    ct: np.ndarray,
    label: np.ndarray,
    cam: np.ndarray | None,
    vid: int,
    plane: str,
    synthesise: SynthesiseFn,
    settings: SynthesisSettings,
    keep=(),
    neighbours_mode: str = "synthesise",
) -> CropSynthesis:
    """Synthesise the pseudo-healthy vertebra ``vid`` of one crop ``(H, AP, LR)`` in plane ``plane``.

    Args:
        ct: uint8 (or float 0-255) CT crop.
        label: VerSe ids on the same grid.
        cam: attention map in [0, 1] on the same grid, or ``None`` (zeros).
        vid: the target vertebra.
        plane: ``sagittal`` or ``coronal``.
        synthesise: the model's batched synthesis (see the module docstring).
        settings: hole size, thresholds, slices per forward pass, model width.
        keep: neighbours left as they are (cut by the scan's edge; :func:`step_order`).
        neighbours_mode: ``"synthesise"`` (the neighbours first) or ``"real"`` (the target alone,
            between the neighbours the crop has; :data:`NEIGHBOUR_MODES`).

    Returns:
        The CT (float 0-255), labels and target probability on the crop's grid; slices not
        through the target are the input's. Raises ``ValueError`` if ``vid`` is not in ``label``.
    """
    stack, (c0, c1) = cut_stack(ct, label, cam, vid, plane, settings.width)
    result = CropSynthesis(
        ct=np.asarray(ct, dtype=np.float32).copy(),
        label=np.asarray(label, dtype=np.uint8).copy(),
        target_prob=np.zeros(np.shape(label), np.float32),  # set below
        slices={plane: stack.index},
    )
    present = np.flatnonzero(np.bincount(np.asarray(label).ravel()))
    prob = None
    for step_vid in step_order(vid, present, keep, neighbours_mode):
        min_area = settings.min_area_px if step_vid != vid else 0  # the target: every slice
        stack, prob, done, passes = synthesis_step(stack, step_vid, synthesise, settings, min_area)
        for part in (stack.ct, stack.label, stack.cam):  # padding stays padding (CT 0 -> -1, maps 0),
            part[..., :c0] = 0  # as in training: the generated rows span the model's whole width
            part[..., c1:] = 0
        result.steps[step_vid] = done
        result.forward_passes += passes
        log.debug("vertebra %s: %d slices synthesised in %d passes", step_vid, done, passes)
    _put_back(result.ct, stack.ct[..., c0:c1], stack.index, plane)
    _put_back(result.label, stack.label[..., c0:c1], stack.index, plane)
    result.target_prob = (result.label == vid).astype(np.float32)
    if prob is not None:
        _put_back(result.target_prob, prob[..., c0:c1], stack.index, plane)
    return result


def fuse_planes(sagittal: CropSynthesis, coronal: CropSynthesis, vid: int) -> CropSynthesis:
    """2.5D fusion: the mean CT, the target where the mean probability of both planes exceeds 0.5.

    Other labels come from the sagittal result, or from the coronal one where the sagittal has
    none (or only the target).
    """
    prob = 0.5 * (sagittal.target_prob + coronal.target_prob)
    others_sag = np.where(sagittal.label == vid, 0, sagittal.label)
    others_cor = np.where(coronal.label == vid, 0, coronal.label)
    label = np.where(others_sag > 0, others_sag, others_cor).astype(np.uint8)
    label[prob > 0.5] = vid
    steps = {v: sagittal.steps.get(v, 0) + coronal.steps.get(v, 0) for v in {*sagittal.steps, *coronal.steps}}
    return CropSynthesis(
        ct=0.5 * (sagittal.ct + coronal.ct),
        label=label,
        target_prob=prob,
        slices={**sagittal.slices, **coronal.slices},
        steps=steps,
        forward_passes=sagittal.forward_passes + coronal.forward_passes,
    )


def to_uint8(ct: np.ndarray) -> np.ndarray:
    """CT 0-255 float -> uint8 like the crops (rounded, clipped)."""
    return np.clip(np.rint(ct), 0, 255).astype(np.uint8)


__all__ = [
    "NEIGHBOUR_MODES",
    "CropSynthesis",
    "SliceStack",
    "SynthesisSettings",
    "cut_stack",
    "fuse_planes",
    "step_order",
    "synthesis_step",
    "synthesise_crop",
    "to_uint8",
]

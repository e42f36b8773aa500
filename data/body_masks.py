"""Body and bone masks by thresholding and hole filling, for volumes that come without masks.

The body is the largest connected component above a threshold (CT: -500 HU; MR: Otsu's threshold
of the volume), closed, then hole-filled slice by slice along every axis (so lungs, bowel gas and
dark MR organs inside the body count as body). Bone (CT only) is HU above 200 inside the body,
hole-filled per slice (marrow inside cortical bone). These are the shape targets the shape
extractor learns when no segmentation exists.

    python -m data.body_masks --input VOL_or_FOLDER --out FOLDER --modality ct|mr [--bone] [--overwrite]

Masks keep their volumes' file names, so ``--out`` must not be the input's folder: that is refused
(exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger(__name__)

CT_BODY_HU = -500.0
CT_BONE_HU = 200.0


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """Fill holes in 3D and in every 2D slice along each axis (cavities open at the volume's edge)."""
    out = ndimage.binary_fill_holes(mask)
    for axis in range(mask.ndim):
        moved = np.moveaxis(out, axis, 0)
        filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
        out = np.moveaxis(filled, 0, axis)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component (26-connected in 3D); an empty mask stays empty."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an array (maximises the between-class variance of a histogram)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = values.min(), values.max()
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def body_mask(
    array: np.ndarray, modality: str, threshold: float | None = None, closing_iter: int = 2
) -> np.ndarray:
    """Boolean body mask of a CT (HU) or MR volume.

    Args:
        array: the volume (HU for CT, any scale for MR).
        modality: 'ct' or 'mr'.
        threshold: overrides the default (CT -500 HU; MR Otsu's threshold).
        closing_iter: iterations of binary closing before hole filling.
    """
    array = np.asarray(array, dtype=np.float32)
    if threshold is None:
        if modality == "ct":
            threshold = CT_BODY_HU
        elif modality == "mr":
            threshold = otsu_threshold(array)
        else:
            raise ValueError(f"unknown modality {modality!r}; use ct | mr")
    mask = largest_component(array > threshold)
    if closing_iter > 0 and mask.any():
        mask = ndimage.binary_closing(mask, iterations=closing_iter, border_value=0) | mask
    return fill_holes_per_slice(mask)


def bone_mask(
    ct_hu: np.ndarray, threshold_hu: float = CT_BONE_HU, body: np.ndarray | None = None
) -> np.ndarray:
    """Boolean bone mask of a CT: HU above ``threshold_hu`` inside the body, holes filled per slice."""
    ct_hu = np.asarray(ct_hu, dtype=np.float32)
    body = body_mask(ct_hu, "ct") if body is None else body
    return fill_holes_per_slice((ct_hu > threshold_hu) & body)


def shape_labels(array: np.ndarray, modality: str, bone: bool = False) -> np.ndarray:
    """uint8 label map: 1 body, 2 bone (CT with ``bone`` only)."""
    body = body_mask(array, modality)
    labels = body.astype(np.uint8)
    if bone:
        if modality != "ct":
            raise ValueError("bone masks by thresholding need CT (bone is dark on MR)")
        labels[bone_mask(array, body=body)] = 2
    return labels


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    from data.nifti_io import load_ct, save_nifti
    from util.errors import InputError

    parser = argparse.ArgumentParser(description="Body (and bone) masks by thresholding and hole filling.")
    parser.add_argument("--input", required=True, help="a NIfTI volume or a folder of *.nii.gz")
    parser.add_argument("--out", required=True, help="output folder (same file names)")
    parser.add_argument("--modality", required=True, choices=("ct", "mr"))
    parser.add_argument("--bone", action="store_true", help="also label bone (2), CT only")
    parser.add_argument("--overwrite", action="store_true")
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if opt.bone and opt.modality != "ct":
        print("error: --bone needs --modality ct (bone is dark on MR)", file=sys.stderr)
        return 2
    src = Path(opt.input)
    files = sorted(src.glob("*.nii*")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        print(f"error: {src}: no NIfTI volumes found", file=sys.stderr)
        return 2
    clash = next((path for path in files if (Path(opt.out) / path.name).resolve() == path.resolve()), None)
    if clash is not None:
        print(
            f"error: {clash}: --out {opt.out} would write the mask over its input volume; "
            "choose another output folder",
            file=sys.stderr,
        )
        return 2
    written = skipped = 0
    try:
        for path in tqdm(files, desc="body masks", disable=len(files) < 2):
            out = Path(opt.out) / path.name
            if out.exists() and not opt.overwrite:
                skipped += 1
                continue
            volume = load_ct(path)
            save_nifti(out, shape_labels(volume.array, opt.modality, opt.bone), volume.affine, dtype=np.uint8)
            written += 1
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"body masks: {written} written, {skipped} skipped (exist; --overwrite to redo) in {opt.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

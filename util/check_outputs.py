"""Check that a fanned-out job (a SLURM array, torchrun ranks) left complete outputs.

    python -m util.check_outputs --stage straighten --dataroot D [--labels_only]
    python -m util.check_outputs --stage synthesis --dataroot D --output_dir O \\
        [--vertebra_json J --phase test]

``straighten``: every patient under ``D/raw`` has its curve json and every crop it lists
(:func:`straighten.patient.is_done`, the test the straightening script uses to skip a patient).
``synthesis``: every straightened crop (those of ``--phase``'s split with ``--phase``) has
``O/CT_fake/<key>.nii.gz`` and ``O/label_fake/<key>.nii.gz``, each a NIfTI whose data read to
the end (a file cut short counts as missing) on the crop's grid (shape and affine).
Prints one summary line, then the missing items (at most ``--show``); exit status 0 when complete,
1 when something is missing (rerun the same jobs: finished items are skipped), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from data.base_dataset import read_split
from data.crops import CropStore
from data.layout import list_patients
from data.nifti_io import read_header
from util.errors import InputError


def missing_patients(root: str | Path, labels_only: bool = False) -> tuple[list[str], int]:
    """(patients whose straightening is not complete, number of patients)."""
    from straighten.patient import is_done

    pids = list_patients(root)
    return [p for p in pids if not is_done(Path(root), p, labels_only)], len(pids)


def readable_nifti(
    path: Path, shape: tuple[int, ...] | None = None, affine: np.ndarray | None = None
) -> bool:
    """True if ``path`` exists and reads whole (a file cut short by a killed job fails: its header
    alone still reads), and, when given, has ``shape`` and ``affine`` (the crop's grid)."""
    try:
        img = nib.load(str(path))
        np.asanyarray(img.dataobj)  # decompress to the end
    except Exception:  # any unreadable file counts as missing
        return False
    if shape is not None and tuple(img.shape[:3]) != tuple(shape):
        return False
    return affine is None or bool(np.allclose(img.affine, affine, atol=1e-3))


def missing_synthesis(
    dataroot: str | Path, output_dir: str | Path, vertebra_json: str | None = None, phase: str | None = None
) -> tuple[list[str], int]:
    """(crop keys without both synthesised volumes, number of crops expected)."""
    store = CropStore(dataroot, need_ct=True)
    keys = store.keys()
    if phase:
        if not vertebra_json:
            raise InputError("--phase needs --vertebra_json")
        split = read_split(vertebra_json, phase)
        keys = [k for k in keys if k in split]
    out = Path(output_dir)
    missing = []
    for k in keys:
        crop = read_header(store.paths(k)[1], "label crop")
        if not all(
            readable_nifti(out / sub / f"{k}.nii.gz", crop.shape[:3], crop.affine)
            for sub in ("CT_fake", "label_fake")
        ):
            missing.append(k)
    return missing, len(keys)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Check that a fanned-out stage left complete outputs.")
    p.add_argument("--stage", choices=("straighten", "synthesis"), default="synthesis")
    p.add_argument("--dataroot", required=True, help="dataset root (raw/, straightened/)")
    p.add_argument("--output_dir", default=None, help="synthesis outputs (CT_fake/, label_fake/)")
    p.add_argument("--vertebra_json", default=None, help="split file, for --phase")
    p.add_argument("--phase", default=None, help="only the crops of this split")
    p.add_argument("--labels_only", action="store_true", help="straightening was run with --labels_only")
    p.add_argument("--show", type=int, default=20, help="missing items to list")
    return p


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if opt.stage == "straighten":
            missing, total = missing_patients(opt.dataroot, opt.labels_only)
            what = "patients straightened"
        else:
            if not opt.output_dir:
                raise InputError("--stage synthesis needs --output_dir")
            missing, total = missing_synthesis(opt.dataroot, opt.output_dir, opt.vertebra_json, opt.phase)
            what = "vertebrae synthesised"
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{total - len(missing)} of {total} {what}; {len(missing)} missing")
    for item in missing[: opt.show]:
        print(f"missing: {item}")
    if len(missing) > opt.show:
        print(f"... and {len(missing) - opt.show} more")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

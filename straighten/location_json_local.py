"""Write each patient's centroid json from its vertebra mask.

    python straighten/location_json_local.py --dataroot D [--label_scheme verse|totalseg]
        [--min_cranial_volume_mm3 6000] [--min_caudal_volume_mm3 8000] [--min_cut_contact_mm2 20]
        [--min_label_contact 0.5]
        [--overwrite] [--shard i/n]

Writes ``D/raw/<pid>/<pid>.json``: ``[{"label": id, "X": i, "Y": j, "Z": k, "complete": bool,
"reason"?}]`` with VerSe ids and the mean voxel index along each axis of the mask as stored. Every
vertebra is listed; one whose body is cut by the scan's edge (any direction) or by another
vertebra's label (touching it over half its cross-section, no disc between), or an end vertebra
below the volume thresholds (mm³, so they hold at any voxel size), has ``complete: false`` and a
reason: it keeps its centroid for the spine curve but gets no crop, height, RHLV or grade.
Labels that cannot be a spine's are refused: one far larger than a vertebra, or vertebrae not
stacked superior to inferior (fragments at the scan's edge left out: they may lie level with their
neighbour).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data import label_schemes
from data.layout import list_patients, raw_case, shard
from data.nifti_io import load_mask, voxel_to_world
from straighten.centroids import (
    MIN_CAUDAL_VOLUME_MM3,
    MIN_CRANIAL_VOLUME_MM3,
    MIN_CUT_CONTACT_MM2,
    MIN_LABEL_CONTACT_FRACTION,
    curve_labels,
    label_centroids,
    label_volumes_mm3,
    vertebra_completeness,
    vertebra_labels,
    write_centroids,
)
from util.errors import InputError, failure_line, input_error
from util.log_prefix import prefixed_logs


def centroids_for(
    mask_path: Path,
    scheme: str,
    min_cranial: float = MIN_CRANIAL_VOLUME_MM3,
    min_caudal: float = MIN_CAUDAL_VOLUME_MM3,
    min_contact_mm2: float = MIN_CUT_CONTACT_MM2,
    min_label_contact: float = MIN_LABEL_CONTACT_FRACTION,
):
    """(centroids of every vertebra, their completeness) of one mask; an input error for labels
    that cannot be a spine's (:func:`stacking_problem`)."""
    mask = load_mask(mask_path, scheme)
    # labels that cannot be a spine's (an organ or binary mask) are named as such first: the
    # completeness step would only call them cut or small
    voxel_mm3 = float(np.prod(mask.spacing))
    labels = vertebra_labels(mask.array)
    centroids = label_centroids(mask.array, labels, voxel_mm3)
    problem = stacking_problem(mask.affine, centroids, label_volumes_mm3(mask.array, voxel_mm3, labels))
    if problem:
        raise input_error(mask_path, problem)
    try:
        completeness = vertebra_completeness(
            mask.array, mask.affine, min_cranial, min_caudal, min_contact_mm2, min_label_contact
        )
    except ValueError as exc:  # no spine curve through the centroids (orientation, coinciding labels)
        raise input_error(mask_path, f"cannot tell which vertebrae are cut: {exc}") from exc
    if not any(c.complete for c in completeness.values()):
        raise input_error(mask_path, "no complete vertebra (every body is cut by the scan's edge, or small)")
    return centroids, completeness


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True, help="dataset root holding raw/<pid>/")
    parser.add_argument("--label_scheme", default="verse", choices=sorted(label_schemes.SCHEMES))
    parser.add_argument(
        "--min_cranial_volume_mm3",
        type=float,
        default=MIN_CRANIAL_VOLUME_MM3,
        help="mark the cranial-most vertebra incomplete if smaller (partially visible)",
    )
    parser.add_argument(
        "--min_caudal_volume_mm3",
        type=float,
        default=MIN_CAUDAL_VOLUME_MM3,
        help="mark the caudal-most vertebra incomplete if smaller (partially visible)",
    )
    parser.add_argument(
        "--min_cut_contact_mm2",
        type=float,
        default=MIN_CUT_CONTACT_MM2,
        help="a body with this much area on the scan's edge is cut (incomplete)",
    )
    parser.add_argument(
        "--min_label_contact",
        type=float,
        default=MIN_LABEL_CONTACT_FRACTION,
        help="a body touching another vertebra's label over this fraction of its cross-section is cut "
        "(0: off)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite existing centroid files")
    parser.add_argument("--shard", default=None, help="process only shard i/n of the patients")
    return parser


def stacking_problem(
    affine: np.ndarray, centroids: dict[int, np.ndarray], volumes_mm3: dict[int, float]
) -> str | None:
    """Why the labels cannot be a spine's, or None (:func:`data.label_schemes.spine_problem`):
    a label far larger than any vertebra, or centroids (voxel indices, put in world space by
    ``affine``) not stacked superior to inferior.

    Stacking is checked on the vertebrae that steer the spine curve (:func:`curve_labels`): a
    fragment at the scan's edge, mostly posterior elements, may lie level with its neighbour.
    """
    steering = curve_labels({v: vol for v, vol in volumes_mm3.items() if v in centroids})
    world = {v: voxel_to_world(affine, centroids[v]) for v in steering}
    return label_schemes.spine_problem(world, volumes_mm3)


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in (
        "min_cranial_volume_mm3",
        "min_caudal_volume_mm3",
        "min_cut_contact_mm2",
        "min_label_contact",
    ):
        value = getattr(opt, name)
        if not math.isfinite(value) or value < 0:
            print(f"error: --{name} must be a finite number >= 0, got {value}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    try:
        pids = shard(list_patients(opt.dataroot), opt.shard)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written, skipped, failed = 0, 0, []
    with prefixed_logs(["straighten.centroids"]) as name_file:
        try:
            for pid in tqdm(pids, desc="centroids", unit="patient"):
                where = Path(opt.dataroot) / "raw" / pid
                try:
                    case = raw_case(opt.dataroot, pid)
                    if case.centroids.is_file() and not opt.overwrite:
                        skipped += 1
                        continue
                    where = case.mask
                    name_file.prefix = str(where)
                    centroids, completeness = centroids_for(
                        case.mask,
                        opt.label_scheme,
                        opt.min_cranial_volume_mm3,
                        opt.min_caudal_volume_mm3,
                        opt.min_cut_contact_mm2,
                        opt.min_label_contact,
                    )
                    for v, state in completeness.items():
                        if not state.complete:
                            tqdm.write(
                                f"{pid}: {label_schemes.vertebra_name(v)} not measurable: {state.reason}"
                            )
                    write_centroids(case.centroids, centroids, completeness)
                except Exception as exc:  # one patient's failure of any kind must not stop the run
                    failed.append(failure_line(exc, where))
                    continue
                written += 1
        except KeyboardInterrupt:
            print(
                f"interrupted: {written} centroid files written, the rest not done (no partial files; "
                "rerun to continue)",
                file=sys.stderr,
            )
            return 130
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    print(
        f"centroids: {written} written, {skipped} already there, {len(failed)} failed "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

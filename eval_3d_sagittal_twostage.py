"""Iterative 3D synthesis of pseudo-healthy vertebrae: neighbours first, then the target.

    python eval_3d_sagittal_twostage.py --dataroot D/straightened --vertebra_json D/vertebra_data.json \\
        --name hv --checkpoints_dir C --plane sagittal|coronal|fusion --output_dir O \\
        [--epoch latest] [--name_coronal hv_cor] [--phase test] [--shard i/n] [--overwrite]

For every straightened crop ``<pid>_<vid>`` (all crops, those of ``--phase``'s split, or
``--vertebrae``), every slice through the target is synthesised: the upper neighbour, then the
lower one, then the target, each step on all slices of the crop in batched forward passes (all
in one on a GPU; on the CPU about 65k pixels per pass, which runs faster there; ``--batch_slices
1`` = the reference's one slice per pass); see :mod:`models.synthesis`.
``--neighbours real`` leaves the neighbours as the scan has them and synthesises the target once
(not the reference's order; closer to the truth on the phantom, and what the demo uses: README).
``fusion`` runs a sagittal and a coronal run (``--name_coronal``) and averages their CT, and
fuses their target probabilities (2.5D). The runs are rebuilt from their saved ``opt.json`` and
checkpoint. Writes ``O/CT_fake/<pid>_<vid>.nii.gz`` (uint8 0-255) and
``O/label_fake/<pid>_<vid>.nii.gz`` (VerSe ids) on the crop's grid and affine; slices not
through the target are the input's. Each output's header names the synthesis that made it (a
digest of the plane, the runs' weights and hole options, the attention maps and the thresholds):
a crop is finished, and skipped unless ``--overwrite``, when both its outputs carry this
synthesis's digest; one of the pair alone (an interrupted write) is redone, and outputs of another
synthesis (another run, epoch, plane or weights) stop the script before any work (pass
``--overwrite`` or another ``--output_dir``).

Several processes: under ``torchrun --nproc_per_node N`` (or any launcher exporting RANK and
WORLD_SIZE) rank r synthesises crops r, r + N, ... of the selection (after ``--shard``), each on
GPU ``LOCAL_RANK``; no process group is needed, the ranks share nothing but the output folder.
Without a launcher, ``--shard i/n`` splits by patient across separate jobs (a SLURM array).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.aligned_sagittal_dataset import HOLE_MARGIN_MM
from data.base_dataset import SPLITS, read_split, split_key
from data.crops import Crop, CropStore, grid_warnings, read_cam
from data.layout import shard
from data.nifti_io import header_text, save_nifti
from data.vertebra_sample import rows_for_mm
from evaluation.heights import not_measurable
from evaluation.rhlv import synthesis_problem
from models import create_model
from models.synthesis import (
    MIN_COMPONENT_AREA_MM2,
    MIN_NEIGHBOUR_AREA_MM2,
    NEIGHBOUR_MODES,
    CropSynthesis,
    SynthesisSettings,
    auto_batch_slices,
    fuse_planes,
    synthesise_crop,
    to_uint8,
)
from options.base_options import load_options, parse_gpu_ids
from util import distributed
from util.checkpoint import file_sha256, record_sha256
from util.errors import InputError, input_error
from util.registry import RegistryError

COLUMN_AXIS = {"sagittal": 1, "coronal": 2}  # the crop axis that runs along an image's columns


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Iterative 3D synthesis of pseudo-healthy vertebrae (neighbours, then the target).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataroot", default=None, help="straightened crops (CT/, label/); default: the run's")
    p.add_argument("--vertebra_json", default=None, help="split file, for --phase; default: the run's")
    p.add_argument("--name", required=True, help="the run (sagittal, or coronal with --plane coronal)")
    p.add_argument("--name_coronal", default=None, help="the coronal run, for --plane fusion")
    p.add_argument("--checkpoints_dir", default="./checkpoints", help="where the runs are")
    p.add_argument("--epoch", default="latest", help="which checkpoint: a number or 'latest'")
    p.add_argument("--plane", default="sagittal", choices=("sagittal", "coronal", "fusion"))
    p.add_argument("--output_dir", required=True, help="CT_fake/ and label_fake/ are written here")
    p.add_argument("--phase", default=None, choices=SPLITS, help="only the vertebrae of this split")
    p.add_argument("--vertebrae", default=None, help="only these crops: comma-separated <pid>_<vid>")
    p.add_argument("--cam_folder", default=None, help="attention maps <pid>_<vid>.nii.gz; default: the run's")
    p.add_argument(
        "--batch_slices",
        type=int,
        default=None,
        help="slices per forward pass (0 = all slices of a step; default: all on a GPU, about 65k "
        "pixels per pass on the CPU)",
    )
    p.add_argument(
        "--min_neighbour_area_mm2",
        type=float,
        default=MIN_NEIGHBOUR_AREA_MM2,
        help="a neighbour is synthesised on slices where its area is at least this",
    )
    p.add_argument(
        "--min_component_mm2",
        type=float,
        default=None,
        help="fragments of a vertebra smaller than this are ignored on a slice "
        f"(default: the run's --min_area_mm2, else {MIN_COMPONENT_AREA_MM2:g})",
    )
    p.add_argument(
        "--neighbours",
        default="synthesise",
        choices=NEIGHBOUR_MODES,
        help="'synthesise': each neighbour is replaced by its pseudo-healthy version before the "
        "target (the reference's order); 'real': the target alone, between the neighbours the scan has",
    )
    p.add_argument("--shard", default=None, help="only shard i/n of the patients")
    p.add_argument("--overwrite", action="store_true", help="redo crops whose outputs exist")
    p.add_argument("--gpu_ids", default="auto", help="'auto', '-1' for the CPU, or '0'")
    return p


@dataclass
class Run:
    """A trained run ready to synthesise."""

    name: str
    opt: argparse.Namespace
    model: object

    @property
    def plane(self) -> str:
        return str(getattr(self.opt, "plane", "sagittal"))

    def synthesise(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.model.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            return self.model.synthesise(batch)


def weights_cached():
    """Spectral-normalised weights computed once for a whole crop instead of once per forward pass."""
    return torch.nn.utils.parametrize.cached()


def load_run(checkpoints_dir: str, name: str, epoch: str, gpu_ids: list[int]) -> Run:
    """Rebuild a run from its ``opt.json`` and load checkpoint ``epoch`` (InputError if missing)."""
    folder = Path(checkpoints_dir) / name
    if not folder.is_dir():
        raise input_error(folder, "no such run (check --checkpoints_dir and --name)")
    opt = load_options(
        folder / "opt.json",
        isTrain=False,
        continue_train=False,
        checkpoints_dir=str(checkpoints_dir),
        name=name,
        epoch=epoch,
        load_iter=0,
        gpu_ids=gpu_ids,
    )
    try:
        model = create_model(opt)
    except RegistryError as exc:
        raise input_error(folder / "opt.json", str(exc)) from exc
    if not callable(getattr(model, "synthesise", None)):
        raise input_error(
            folder / "opt.json", f"model {opt.model!r} has no synthesise(); use a healthivert run"
        )
    model.load_networks(epoch)
    model.eval()
    return Run(name, opt, model)


def select_crops(store: CropStore, opt: argparse.Namespace, vertebra_json: str | None) -> list[str]:
    """The crop keys to synthesise: --vertebrae, else --phase's split, else all; then --shard; then
    this rank's share under torchrun (empty is fine there: more ranks than crops)."""
    if opt.vertebrae:
        keys = [k.strip() for k in opt.vertebrae.split(",") if k.strip()]
        missing = [k for k in keys if k not in store]
        if missing:
            raise input_error(store.folder, f"no crop for {', '.join(missing[:5])}")
    elif opt.phase:
        if not vertebra_json:
            raise InputError("--phase needs --vertebra_json (the run has none saved)")
        split = read_split(vertebra_json, opt.phase)
        keys = sorted(k for k in split if k in store)
        absent = len(split) - len(keys)
        if absent:
            print(f"warning: {absent} vertebrae of split {opt.phase!r} have no crop in {store.folder}")
    else:
        keys = store.keys()
    pids = sorted({split_key(k)[0] for k in keys})
    chosen = set(shard(pids, opt.shard))
    keys = [k for k in keys if split_key(k)[0] in chosen]
    if not keys:
        raise input_error(store.folder, "no vertebra selected (empty split, shard or crop folder)")
    return distributed.rank_slice(keys, distributed.env_rank(), distributed.env_world_size())


def check_cams(folder: str | None, keys: list[str]) -> None:
    """Raise before any work if an attention map is missing."""
    if not folder:
        return
    missing = [k for k in keys if not (Path(folder) / f"{k}.nii.gz").is_file()]
    if missing:
        raise input_error(
            Path(folder) / f"{missing[0]}.nii.gz",
            f"attention map not found ({len(missing)} of {len(keys)} missing; "
            "pass --cam_folder '' to run without maps)",
        )


def crop_cam(folder: str | None, crop: Crop) -> np.ndarray | None:
    """The crop's attention map in [0, 1] (:func:`data.crops.read_cam`), or None without a folder."""
    if not folder:
        return None
    return read_cam(Path(folder) / f"{crop.key}.nii.gz", crop.label.shape, crop.affine)


def settings_for(crop: Crop, run: Run, plane: str, opt: argparse.Namespace) -> SynthesisSettings:
    """Hole and thresholds in this crop's pixels (from mm), model width for this plane."""
    spacing = crop.spacing_mm
    pixel_mm2 = float(spacing[0] * spacing[COLUMN_AXIS[plane]])
    component_mm2 = component_area_mm2(run, opt)
    width = int(crop.label.shape[1])  # both planes give images as wide as the sagittal ones
    batch_slices = opt.batch_slices
    if batch_slices is None:
        batch_slices = auto_batch_slices(run.model.device.type, int(crop.label.shape[0]) * width)
    return SynthesisSettings(
        hole_rows=max(1, rows_for_mm(getattr(run.opt, "mask_height_mm", 40.0), spacing[0])),
        margin_rows=rows_for_mm(getattr(run.opt, "hole_margin_mm", HOLE_MARGIN_MM), spacing[0]),
        min_area_px=opt.min_neighbour_area_mm2 / pixel_mm2,
        min_component_px=component_mm2 / pixel_mm2,
        batch_slices=batch_slices,
        width=width,
        row_spacing_mm=float(spacing[0]),
    )


def synthesise_one(crop: Crop, runs: dict[str, Run], cam: np.ndarray | None, opt, keep=()) -> CropSynthesis:
    """The crop's synthesis in each run's plane (fused for two); ``keep``: neighbours left as they
    are (cut by the scan's edge)."""
    with weights_cached():
        results = {
            plane: synthesise_crop(
                crop.ct,
                crop.label,
                cam,
                crop.vid,
                plane,
                run.synthesise,
                settings_for(crop, run, plane, opt),
                keep,
                opt.neighbours,
            )
            for plane, run in runs.items()
        }
    if len(results) == 2:
        return fuse_planes(results["sagittal"], results["coronal"], crop.vid)
    return next(iter(results.values()))


DESCRIP_PREFIX = "healthivert synthesis "


def run_component_area_mm2(run: Run) -> float:
    """The run's own area under which a piece of a vertebra is ignored on a slice: its
    ``--min_area_mm2``, else :data:`MIN_COMPONENT_AREA_MM2`."""
    return float(getattr(run.opt, "min_area_mm2", MIN_COMPONENT_AREA_MM2))


def component_area_mm2(run: Run, opt: argparse.Namespace) -> float:
    """``--min_component_mm2``, else :func:`run_component_area_mm2`."""
    return float(opt.min_component_mm2) if opt.min_component_mm2 is not None else run_component_area_mm2(run)


def synthesis_digest(runs: dict[str, Run], opt: argparse.Namespace, cam_folder: str | None) -> str:
    """What decides every crop's outputs, as a short digest: the plane, each run's weights (file
    contents) and hole options, the attention maps' folder, the area thresholds and how the
    neighbours enter
    (``--min_component_mm2`` only where it differs from what each run gives by itself: the same
    area given or left to the run is the same synthesis). :func:`inputs_digest` adds what each
    crop's outputs are made from."""
    given = opt.min_component_mm2
    if given is not None and all(run_component_area_mm2(run) == float(given) for run in runs.values()):
        given = None
    record = {
        "plane": opt.plane,
        "runs": {
            plane: {
                "weights": {
                    net: file_sha256(Path(opt.checkpoints_dir) / run.name / f"{opt.epoch}_net_{net}.pth")
                    for net in sorted(run.model.networks())
                },
                **{
                    k: getattr(run.opt, k, None) for k in ("mask_height_mm", "hole_margin_mm", "min_area_mm2")
                },
            }
            for plane, run in sorted(runs.items())
        },
        "cam_folder": str(Path(cam_folder).resolve()) if cam_folder else "",
        "min_neighbour_area_mm2": opt.min_neighbour_area_mm2,
        "min_component_mm2": given,
    }
    if opt.neighbours != "synthesise":  # the digest of the reference's order is the one it always had
        record["neighbours"] = opt.neighbours
    return record_sha256(record)


def inputs_digest(store: CropStore, key: str, cam_folder: str | None, keep=()) -> str:
    """A short digest of what crop ``key``'s outputs are made from: the contents of its CT, its
    label and its attention map (none without a folder), and the neighbours it leaves as they are
    (``keep``). Crops straightened again, or maps made again, give another; the same files in a
    dataset moved elsewhere give the same."""
    files = [*store.paths(key), *([Path(cam_folder) / f"{key}.nii.gz"] if cam_folder else [])]
    record = [*(file_sha256(f) for f in files), sorted(int(v) for v in keep)]
    return record_sha256(record)


def made_by(path: Path) -> tuple[str, str] | None:
    """(synthesis digest, inputs digest) in an output's header; None when the file is absent,
    ("", "") when it names no synthesis (a foreign file), an empty inputs digest when it names
    none (written before outputs recorded their inputs)."""
    if not path.exists():
        return None
    try:
        text = header_text(path, "synthesised volume")
    except InputError:
        return ("", "")
    if not text.startswith(DESCRIP_PREFIX):
        return ("", "")
    synthesis, _, inputs = text[len(DESCRIP_PREFIX) :].partition(" ")
    return synthesis, inputs


def finished_and_foreign(
    inputs: dict[str, str], out: Path, digest: str
) -> tuple[set[str], list[Path], list[str]]:
    """(crops whose two outputs are both this synthesis's and made from the crop's present inputs
    (``inputs``: each crop's :func:`inputs_digest`), outputs of another synthesis that a crop not
    yet finished would overwrite, crops whose outputs this synthesis made from other inputs or
    before outputs recorded theirs). A crop with any output of this synthesis is redone, whatever
    its partner holds: an interrupted write, or outputs made from crops or maps since replaced."""
    finished, foreign, stale = set(), [], []
    for key, made_from in inputs.items():
        paths = [out / sub / f"{key}.nii.gz" for sub in ("CT_fake", "label_fake")]
        tags = [made_by(p) for p in paths]
        ours = [t for t in tags if t is not None and t[0] == digest]
        if len(ours) == 2 and all(t[1] == made_from for t in ours):
            finished.add(key)
        elif not ours:
            foreign += [p for p, t in zip(paths, tags, strict=True) if t is not None]
        elif len(ours) == 2:
            stale.append(key)
    return finished, foreign, stale


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(opt.output_dir)
    try:
        if opt.batch_slices is not None and opt.batch_slices < 0:
            raise InputError("--batch_slices must be 0 (all) or a positive number")
        if opt.plane == "fusion" and not opt.name_coronal:
            raise InputError("--plane fusion needs --name_coronal (a run trained on coronal slices)")
        gpu_ids = parse_gpu_ids(opt.gpu_ids)
        if gpu_ids and distributed.env_world_size() > 1:
            gpu_ids = [distributed.local_rank()]  # one GPU per process under torchrun
        wanted = {"sagittal": opt.name} if opt.plane == "fusion" else {opt.plane: opt.name}
        if opt.plane == "fusion":
            wanted["coronal"] = opt.name_coronal
        runs = {}
        for plane, name in wanted.items():
            run = load_run(opt.checkpoints_dir, name, opt.epoch, gpu_ids)
            if run.plane != plane:
                raise input_error(
                    Path(opt.checkpoints_dir) / name, f"run was trained on {run.plane} slices, not {plane}"
                )
            runs[plane] = run
        first = next(iter(runs.values()))
        dataroot = opt.dataroot or getattr(first.opt, "dataroot", None)
        if not dataroot:
            raise InputError("--dataroot is needed (the run saved none)")
        store = CropStore(dataroot, need_ct=True)
        if len(store) == 0:
            raise input_error(store.folder, "no crops with both CT/ and label/")
        keys = select_crops(store, opt, opt.vertebra_json or getattr(first.opt, "vertebra_json", None))
        cam_folder = opt.cam_folder if opt.cam_folder is not None else getattr(first.opt, "cam_folder", None)
        check_cams(cam_folder, keys)
        run_dirs = {run.name: Path(opt.checkpoints_dir) / run.name for run in runs.values()}
        for line in grid_warnings(store, keys, run_dirs):
            print(line)
        digest = synthesis_digest(runs, opt, cam_folder)
        cut = not_measurable(store.folder)  # neighbours cut by the scan's edge stay as they are
        keep = {key: {v for (pid, v) in cut if pid == split_key(key)[0]} for key in keys}
        inputs = {key: inputs_digest(store, key, cam_folder, keep[key]) for key in keys}
        finished, foreign, stale = (
            (set(), [], []) if opt.overwrite else finished_and_foreign(inputs, out, digest)
        )
        if foreign:
            raise input_error(
                foreign[0],
                f"made by another synthesis (another run, epoch, plane, weights, attention maps or "
                f"thresholds; {len(foreign)} such outputs here); pass --overwrite to redo them, or "
                "another --output_dir",
            )
        if stale:
            print(
                f"{len(stale)} crops ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}) have "
                "outputs made from other crops or attention maps than these: synthesised again"
            )
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    ct_dir, label_dir = out / "CT_fake", out / "label_fake"
    world = distributed.env_world_size()
    start = time.perf_counter()
    done, skipped, passes, implausible = 0, 0, 0, 0
    bar = tqdm(keys, desc=f"synthesis ({opt.plane})", unit="vertebra")
    for key in bar:
        ct_path, label_path = ct_dir / f"{key}.nii.gz", label_dir / f"{key}.nii.gz"
        if key in finished:
            skipped += 1
            continue
        try:
            crop = store.load(key)
            result = synthesise_one(crop, runs, crop_cam(cam_folder, crop), opt, keep[key])
        except (InputError, ValueError) as exc:
            bar.close()  # the error on a line of its own, after the bar
            if not isinstance(exc, InputError):  # the crop's content (no voxel of its vertebra)
                exc = input_error(store.paths(key)[1], str(exc))
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if not result.steps.get(crop.vid):
            bar.write(f"warning: {key}: no slice of vertebra {crop.vid} was synthesised; written unchanged")
        else:
            problem = synthesis_problem(result.label == crop.vid, crop.label == crop.vid)
            if problem:
                implausible += 1
                bar.write(f"warning: {key}: {problem}")
        # the old pair goes first, so an interruption leaves one new file (redone on a rerun),
        # never a new CT beside an old label
        label_path.unlink(missing_ok=True)
        ct_path.unlink(missing_ok=True)
        descrip = f"{DESCRIP_PREFIX}{digest} {inputs[key]}"
        save_nifti(ct_path, to_uint8(result.ct), crop.affine, dtype=np.uint8, descrip=descrip)
        save_nifti(label_path, result.label.astype(np.uint8), crop.affine, dtype=np.uint8, descrip=descrip)
        store.release(key)
        done += 1
        passes += result.forward_passes
    seconds = time.perf_counter() - start
    per = f", {seconds / done:.2f} s/vertebra, {passes} forward passes" if done else ""
    print(
        f"synthesised {done} vertebrae ({opt.plane}) in {seconds:.1f} s{per}; "
        f"{skipped} already done; outputs in {out}"
        + (f" (rank {distributed.env_rank()} of {world})" if world > 1 else "")
    )
    if implausible:
        print(
            f"warning: {implausible} of {done} synthesised vertebrae are not plausible healthy twins "
            "(empty, or under half the original's volume): is the run trained on scans like these? "
            "RHLV_quantification.py gives them no RHLV"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grad-CAM++ maps of the fracture classifier on the slices of every straightened crop (HGAM input).

    python Attention/grad_CAM_3d_sagittal.py --dataroot D [--checkpoint C/<name>/classifier.pth]
        [--cam_input unmasked|masked] [--cam_norm slice|vertebra] [--plane sagittal|coronal]
        [--batch_size 32]
        [--no_png] [--min_grade G] [--shard i/n] [--overwrite] [--gpu_ids auto|-1|0]

For every crop ``D/straightened/CT/<pid>_<vid>.nii.gz`` writes ``D/heatmap/<pid>_<vid>.nii.gz`` on
the crop's grid and affine (float32): on every slice of ``--plane`` that cuts the target
vertebra, the ``grad-cam`` package's Grad-CAM++ map for class 1 (fractured) from the last block
of the classifier, scaled to [0, 1] and interpolated onto the slice with each feature cell on the
pixel its receptive field is centred on; zero on the other slices. ``--cam_norm slice`` (default,
as the reference) min-max normalises each slice's map on its own, so a slice where the classifier
sees nothing is stretched to [0, 1] like the one it looked at hardest; ``vertebra`` divides the
raw maps (>= 0 after Grad-CAM++'s ReLU) of all the slices through the target by their largest
value, so a slice keeps its strength relative to the vertebra's others (the classifier's
probability is not folded in: every vertebra's strongest cell is 1).
``--cam_input unmasked`` (default) feeds the slice as it is, as the reference code did;
``masked`` first removes the target's height band (its rows set to 0), as the paper's
figure shows. ``D/heatmap/png/<pid>_<vid>.png`` overlays the map on the centre slice.

Reruns skip finished maps unless ``--overwrite``: a map counts as finished when it is not older
than its crop, and ``D/heatmap/cam_maps.json`` records the classifier (a hash of its weights), the
plane, ``--cam_input`` and ``--cam_norm`` the folder's maps were made with (a record without
``cam_norm`` predates the option: ``slice``); a rerun with another of these is refused before any
work (exit 2) unless ``--overwrite``.

With a split file (``--vertebra_json``, default ``D/vertebra_data.json`` when present) the
summary line also gives, over the fractured vertebrae (grade >= the classifier's
``fracture_min_grade``), the share whose mean map inside the target's body exceeds the mean
outside it (on the slices through the target).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm import tqdm

from Attention.classifier import load_classifier
from Attention.slices import (
    PLANE_AXIS,
    height_band,
    inside_outside_means,
    put_slices,
    remove_band,
    take_slices,
    target_slices,
    to_unit,
)
from Attention.train_classifier import CHECKPOINT_NAME, add_common_options
from data.base_dataset import read_split, split_key
from data.crops import Crop, CropStore, crop_key, save_like
from data.layout import shard
from data.nifti_io import header_text
from options.base_options import device_of, parse_gpu_ids
from util.atomic import read_json, write_json
from util.checkpoint import file_sha256, record_sha256
from util.errors import InputError, folder_problem, input_error

log = logging.getLogger(__name__)

# In the output folder: what made its maps (classifier weights, plane, input, scaling), so that a
# rerun never takes a map made by another classifier or with other options for a finished one.
MAPS_RECORD = "cam_maps.json"
# What a record written before an entry existed means by its absence: the maps of that time.
RECORD_DEFAULTS = {"cam_norm": "slice"}
# In each map's NIfTI header: what made that map (a digest of its record), so a map left by another
# classifier or other options (a partial --overwrite: --min_grade, --shard, an interrupted run)
# is never taken for a finished one, whatever the folder's record says now.
DESCRIP_PREFIX = "healthivert cam "
CAM_NORMS = ("slice", "vertebra")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=f"classifier weights (default <checkpoints_dir>/<name>/{CHECKPOINT_NAME})",
    )
    parser.add_argument("--cam_input", default="unmasked", choices=("unmasked", "masked"))
    parser.add_argument(
        "--cam_norm",
        default="slice",
        choices=CAM_NORMS,
        help="scale each slice's map to [0, 1] on its own (the reference), or all the slices of a "
        "vertebra by their largest raw value, so slices keep their relative strength",
    )
    parser.add_argument(
        "--plane", default=None, choices=sorted(PLANE_AXIS), help="default: the plane the classifier learnt"
    )
    parser.add_argument("--batch_size", type=int, default=32, help="slices per forward/backward pass")
    parser.add_argument("--out", default=None, help="output folder (default <dataroot>/heatmap)")
    parser.add_argument("--no_png", action="store_true", help="no PNG overlay per vertebra")
    parser.add_argument(
        "--min_grade",
        type=int,
        default=None,
        choices=(0, 1, 2, 3),
        help="map only the split's vertebrae of at least this grade (default: every crop)",
    )
    parser.add_argument("--shard", default=None, help="process only shard i/n of the crops")
    parser.add_argument("--overwrite", action="store_true", help="redo maps that exist")
    return parser


def cell_weights(n_pixels: int, n_cells: int, stride: int) -> np.ndarray:
    """(n_pixels, n_cells) linear interpolation weights that put cell ``i`` on pixel ``stride * i``
    (the centre of its receptive field), constant beyond the first and last cells."""
    pos = np.clip(np.arange(n_pixels) / stride, 0, n_cells - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_cells - 1)
    frac = pos - lo
    weights = np.zeros((n_pixels, n_cells))
    np.add.at(weights, (np.arange(n_pixels), lo), 1 - frac)
    np.add.at(weights, (np.arange(n_pixels), hi), frac)
    return weights


def vertebra_scaled(raw: np.ndarray) -> np.ndarray:
    """Raw maps (>= 0) of all the slices of one vertebra divided by their largest value, so each
    slice keeps its strength relative to the others; maps that are all zero stay zero."""
    peak = float(raw.max()) if raw.size else 0.0
    return raw / peak if peak > 0 else np.zeros_like(raw)


class CamMaker:
    """Grad-CAM++ (``pytorch_grad_cam.GradCAMPlusPlus``) maps of class 1 for the slices of a vertebra.

    The package computes its maps on the cells of the target layer, ReLU-clips them and min-max
    normalises each slice's map there (``scale_cam_image``, once per layer and once after
    averaging the layers); the raw, clipped maps are kept too, for ``norm="vertebra"``
    (:func:`vertebra_scaled`). The package would then resize the cell grid to the image as if each
    cell covered its own ``stride`` block, which puts every cell half a block (7.5 pixels at stride
    16) below and behind the pixel its receptive field is centred on. The cells are instead placed
    on the pixels they are centred on (:attr:`SEResNet2d.cam_stride`) and interpolated linearly
    between.
    """

    def __init__(
        self, model: torch.nn.Module, device: torch.device, batch_size: int = 32, norm: str = "slice"
    ):
        from pytorch_grad_cam import GradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if norm not in CAM_NORMS:
            raise ValueError(f"norm {norm!r}: expected one of {CAM_NORMS}")

        class CellGradCAMPlusPlus(GradCAMPlusPlus):
            raw: np.ndarray | None = None

            def get_target_width_height(self, input_tensor):  # keep the maps on the cells
                return None

            def get_cam_image(self, *args, **kwargs):  # the batch's maps before any normalisation
                cam = super().get_cam_image(*args, **kwargs)
                self.raw = np.maximum(cam, 0)
                return cam

        self.cam = CellGradCAMPlusPlus(model=model, target_layers=[model.cam_layer])
        self.target = ClassifierOutputTarget(1)
        self.stride = int(getattr(model, "cam_stride", 16))
        self.device = device
        self.batch_size = batch_size
        self.norm = norm

    def cells(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, H, W) float images in [0, 1] -> the (n, h, w) maps on the cells: the package's
        (normalised per slice) and the raw ones (>= 0)."""
        scaled, raw = [], []
        for start in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            x = x.unsqueeze(1).to(self.device)
            scaled.append(self.cam(input_tensor=x, targets=[self.target] * len(x)))
            raw.append(self.cam.raw)
        return np.concatenate(scaled), np.concatenate(raw)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W) float images in [0, 1], all the slices of one vertebra (``norm="vertebra"``
        scales them together) -> (n, H, W) float32 maps in [0, 1]."""
        height, width = images.shape[1:]
        scaled, raw = self.cells(images)
        cells = scaled if self.norm == "slice" else vertebra_scaled(raw)
        rows = cell_weights(height, cells.shape[1], self.stride)
        cols = cell_weights(width, cells.shape[2], self.stride)
        maps = np.einsum("Hh,nhw,Ww->nHW", rows, cells, cols)
        return np.clip(maps.astype(np.float32), 0.0, 1.0)


def crop_heatmap(crop: Crop, cam: CamMaker, plane: str, cam_input: str) -> tuple[np.ndarray, np.ndarray]:
    """The crop's heatmap volume and the slice indices it covers (those cutting the target)."""
    idx = target_slices(crop.label, crop.vid, plane)
    if idx.size == 0:
        raise input_error(crop.key, f"vertebra {crop.vid} is not in its own label crop")
    images = to_unit(take_slices(crop.ct, idx, plane))
    if cam_input == "masked":
        images = remove_band(images, height_band(crop.label, crop.vid))
    return put_slices(crop.ct.shape, idx, cam(images), plane), idx


def save_overlay(
    crop: Crop, heatmap: np.ndarray, idx: np.ndarray, plane: str, path: Path, title: str
) -> None:
    """PNG: the centre slice through the target, with the map over it and the target outlined."""
    from util.plotting import draw_slice, plt, save_figure

    centre = idx[len(idx) // 2 : len(idx) // 2 + 1]
    image = to_unit(take_slices(crop.ct, centre, plane))[0]
    labels = (take_slices(crop.label, centre, plane)[0] == crop.vid).astype(np.uint8)
    spacing = crop.spacing_mm
    col_axis = 1 if plane == "sagittal" else 2
    fig, ax = plt.subplots(figsize=(3.6, 3.8))
    draw_slice(ax, image, labels, (spacing[0], spacing[col_axis]), title, windowed=True)
    ax.imshow(
        take_slices(heatmap, centre, plane)[0],
        cmap="jet",
        alpha=0.4,
        vmin=0,
        vmax=1,
        aspect=spacing[0] / spacing[col_axis],
    )
    save_figure(fig, path)


def fractured_keys(split_file: Path, min_grade: int) -> set[str]:
    """Crop keys of every split's vertebrae with grade >= ``min_grade``."""
    data = read_split(split_file)
    return {
        crop_key(*split_key(k)) for entries in data.values() for k, g in entries.items() if g >= min_grade
    }


def check_out_folder(out: Path) -> None:
    """Raise if ``out`` cannot be a folder to write maps in (:func:`util.errors.folder_problem`)."""
    problem = folder_problem(out)
    if problem:
        raise input_error(out, f"--out {problem}")


def write_problem(exc: OSError, target: Path) -> str:
    """The OS error's reason, with the folder it names when that is not the target's own."""
    reason = exc.strerror or type(exc).__name__
    named = Path(exc.filename) if exc.filename else None
    return f"{named}: {reason}" if named is not None and named.parent != target.parent else reason


def maps_record(checkpoint: Path, plane: str, cam_input: str, cam_norm: str) -> dict:
    """What a folder's maps depend on besides their crops: the classifier's weights, plane, input
    and scaling."""
    return {
        "classifier_sha256": file_sha256(checkpoint),
        "plane": plane,
        "cam_input": cam_input,
        "cam_norm": cam_norm,
    }


def record_problem(out: Path, record: dict) -> str | None:
    """Why the maps already in ``out`` are not those this run would make, or None."""
    path = out / MAPS_RECORD
    if not path.exists():
        return None
    old = read_json(path, "maps record")
    old = old if isinstance(old, dict) else {}
    what = {
        "classifier_sha256": "another classifier",
        "plane": "--plane",
        "cam_input": "--cam_input",
        "cam_norm": "--cam_norm",
    }
    differ = []
    for name, value in record.items():
        made = old.get(name, RECORD_DEFAULTS.get(name))
        if made != value:
            differ.append(what[name] if name == "classifier_sha256" else f"{what[name]} {made}")
    if not differ:
        return None
    return (
        f"the maps here were made with {' and '.join(differ)}; pass --overwrite to make them again "
        f"({record['plane']}, --cam_input {record['cam_input']}, --cam_norm {record['cam_norm']}, "
        "this classifier), or choose another --out"
    )


def map_digest(path: Path) -> str | None:
    """The record digest in a map's header; None for a map written before maps carried one."""
    try:
        text = header_text(path, "CAM map")
    except InputError:
        return ""  # unreadable: not finished
    return text[len(DESCRIP_PREFIX) :] if text.startswith(DESCRIP_PREFIX) else None


def is_finished(path: Path, sources: tuple[Path, ...], digest: str) -> bool:
    """A map exists, is not older than the crop files it was made from and was made by this
    classifier and these options, ``digest`` (a map without a digest in its header predates
    them: the folder's record speaks for it)."""
    if not path.exists():
        return False
    made = path.stat().st_mtime
    if not all(not src.exists() or src.stat().st_mtime <= made for src in sources):
        return False
    own = map_digest(path)
    return own is None or own == digest


def run(opt: argparse.Namespace) -> int:
    device = device_of(opt)
    out = Path(opt.out or Path(opt.dataroot) / "heatmap")
    check_out_folder(out)
    checkpoint = Path(opt.checkpoint or Path(opt.checkpoints_dir) / opt.name / CHECKPOINT_NAME)
    model, config = load_classifier(checkpoint, device)
    plane = opt.plane or config.plane
    if plane != config.plane:
        raise input_error(
            checkpoint, f"the classifier learnt {config.plane} slices; train one with --plane {plane}"
        )
    store = CropStore(opt.dataroot, cache_dir=opt.cache_dir)
    split_file = Path(opt.vertebra_json or Path(opt.dataroot) / "vertebra_data.json")
    min_grade = int(config.extra.get("options", {}).get("fracture_min_grade", 2))
    use_split = opt.vertebra_json or opt.min_grade is not None or split_file.exists()
    fractured = fractured_keys(split_file, min_grade) if use_split else set()
    keys = store.keys()
    if not keys:
        raise input_error(store.folder, "no CT crops to map (CT/ and label/ hold no common <pid>_<vid>)")
    if opt.min_grade is not None:
        chosen = fractured_keys(split_file, opt.min_grade)
        keys = [k for k in keys if k in chosen]
        if not keys:
            raise input_error(
                split_file,
                f"no vertebra of grade >= {opt.min_grade} in the split has a crop in {store.folder}",
            )
    try:
        keys = shard(keys, opt.shard)
    except ValueError as exc:
        raise input_error(None, str(exc)) from None
    if not keys:  # more shards than crops: this one has nothing to do, which is not an error
        print(f"shard {opt.shard}: no crops to map (the other shards have them all)")
        return 0
    record = maps_record(checkpoint, plane, opt.cam_input, opt.cam_norm)
    problem = None if opt.overwrite else record_problem(out, record)
    if problem:
        raise input_error(out / MAPS_RECORD, problem)
    unrecorded = not (out / MAPS_RECORD).exists() and any(out.glob("*.nii.gz"))
    if unrecorded and not opt.overwrite:
        log.warning("%s: maps without a record of what made them are kept (--overwrite redoes them)", out)
    pending_record = opt.overwrite or not unrecorded  # written with the first map
    cam = CamMaker(model, device, opt.batch_size, opt.cam_norm)
    digest = record_sha256(record)  # into each map's header

    start = time.perf_counter()
    written, skipped, failed, inside_higher = 0, 0, [], []
    with tqdm(keys, desc=f"grad-cam++ {plane}", unit="vertebra") as bar:  # closed before an error line
        for key in bar:
            path = out / f"{key}.nii.gz"
            overlay_missing = not opt.no_png and not (out / "png" / f"{key}.png").exists()
            if not opt.overwrite and not overlay_missing and is_finished(path, store.paths(key), digest):
                skipped += 1
                continue
            try:
                crop = store.load(key)
                if config.spacing_mm and not np.allclose(crop.spacing_mm, config.spacing_mm, rtol=0.05):
                    log.warning(
                        "%s: voxels of %s mm; the classifier learnt %s mm",
                        key,
                        crop.spacing_mm,
                        config.spacing_mm,
                    )
                heatmap, idx = crop_heatmap(crop, cam, plane, opt.cam_input)
            except InputError as exc:
                failed.append(str(exc))
                continue
            target = path
            try:
                save_like(path, heatmap, crop.affine, descrip=DESCRIP_PREFIX + digest)
                if not opt.no_png:
                    target = out / "png" / f"{key}.png"
                    title = f"{key} ({opt.cam_input}, per {opt.cam_norm})"
                    save_overlay(crop, heatmap, idx, plane, target, title)
            except OSError as exc:  # the output folder, not the crop: every other map would fail too
                if target != path:
                    path.unlink(missing_ok=True)  # no map without its overlay (a rerun would skip it)
                raise input_error(target, f"cannot write: {write_problem(exc, target)}") from exc
            if pending_record:
                target = out / MAPS_RECORD
                try:
                    write_json(target, record)
                except OSError as exc:
                    raise input_error(target, f"cannot write: {write_problem(exc, target)}") from exc
                pending_record = False
            written += 1
            if key in fractured:
                inside, outside = inside_outside_means(heatmap, crop.label == crop.vid, idx, plane)
                inside_higher.append(inside > outside)
    seconds = time.perf_counter() - start
    for message in failed:
        print(f"error: {message}", file=sys.stderr)
    per = f", {seconds / written:.2f} s/vertebra" if written else ""
    share = (
        f"; fractured vertebrae with more map inside the body than outside: "
        f"{sum(inside_higher)}/{len(inside_higher)} ({np.mean(inside_higher):.0%})"
        if inside_higher
        else ""
    )
    print(
        f"wrote {written} {opt.cam_input} {plane} maps (per {opt.cam_norm}) in {seconds:.1f} s "
        f"on {device}{per}; "
        f"{skipped} already done, {len(failed)} failed{share}; maps in {out}"
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if opt.batch_size < 1:
        print("error: --batch_size must be >= 1", file=sys.stderr)
        return 2
    try:
        opt.gpu_ids = parse_gpu_ids(opt.gpu_ids)
        return run(opt)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``--dataset_mode aligned_sagittal``: one vertebra at one sagittal slice, squeezed around a hole.

    python train.py --dataroot D/straightened --vertebra_json D/vertebra_data.json \\
        --dataset_mode aligned_sagittal [--cam_folder D/heatmap] [--vert_class normal]

``--dataroot`` is the folder holding ``CT/`` and ``label/`` (a dataset root works too: its
``straightened/`` is used, and the log says so). ``--vertebra_json`` defaults to
``<dataset root>/vertebra_data.json``. The split of ``--phase`` is used, restricted by
``--vert_class``: ``normal`` (grade <= ``--normal_max_grade``, default 0), ``abnormal`` or
``all``. One item is one vertebra at one slice (sample keys: :mod:`data.vertebra_sample` and
the class docstring).

Slices. Training (``--phase train``) draws a slice from the central 80 % of the target's extent
along the slice axis with triangular weights (REFERENCE.md section 3.2). The draw is a function
of ``(--seed, epoch, index)`` only (a hash of the three, :func:`data.vertebra_sample.seeded_unit`),
so it is the same in any worker process and a resumed run sees exactly the slices a straight run sees;
the epoch reaches the workers through a shared-memory counter set by :meth:`set_epoch`. Other
phases take the valid slice nearest the centre, deterministically. A slice is valid when the
target covers at least ``--min_area_mm2`` on it, components smaller than that ignored; if no
central slice is valid the whole extent is tried, then an error names the crop.

Hole. ``round(--mask_height_mm / row spacing)`` rows; a target taller than that gets a hole of
its height plus ``--hole_margin_mm`` (that sample only), so tall vertebrae train too.

Caching. Crops are decoded once by :class:`data.crops.CropStore` (in memory, or memory-mapped
``.npy`` files under ``--crop_cache_dir`` for data larger than memory; each loader worker keeps
its own in-memory copy, so use the disk cache for large data with many workers). CAM maps
(``--cam_folder/<pid>_<vid>.nii.gz``) are cached the same way as float16. Without
``--cam_folder`` the CAM channel is zero, logged once per process.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data import vertebra_sample as vs
from data.base_dataset import BaseDataset, read_split, split_key
from data.crops import Crop, CropStore, prune_cache, read_cam, source_tag
from data.label_schemes import is_vertebra, neighbours
from util.errors import InputError, input_error

log = logging.getLogger(__name__)

VERT_CLASSES = ("normal", "abnormal", "all")
# a target taller than the hole gets a hole of its height plus this (mm; --hole_margin_mm)
HOLE_MARGIN_MM = 4.0
_ZERO_CAM_LOGGED = False


@dataclass(frozen=True)
class VertebraSlices:
    """What one vertebra needs for sampling, computed once per crop."""

    slices: np.ndarray  # valid slice indices (central ones when any is valid)
    weights: np.ndarray  # triangular draw weights over ``slices``
    centre: float  # centre of the target's extent along the slice axis
    n: int  # slices in that extent
    central: int  # the valid slice nearest the centre (val/test)
    row_spacing_mm: float
    hole_rows: int
    margin_rows: int
    min_component_px: float
    fragmented: frozenset[int]  # slices where the target has pieces below the area threshold
    upper: int  # the neighbour above among the labels present (0: none)
    lower: int  # the neighbour below (0: none)


class AlignedSagittalDataset(BaseDataset):
    """Squeezed single-slice samples of straightened vertebrae (REFERENCE.md section 3.3).

    ``__getitem__`` returns float32 tensors ``ct``, ``ct_masked``, ``hole``, ``target_mask``,
    ``neighbour_mask``, ``cam`` (1 x H x W), ``slice_ratio``, ``height``, ``row_spacing_mm``
    (shape (1,)); int64 ``x1``, ``x2``, ``band_top``, ``band_bottom``, ``hole_rows``, ``grade``,
    ``slice_index``, ``col_start``, ``col_stop`` (valid image columns), ``upper_vid``,
    ``lower_vid`` (shape (1,)); and strings ``key`` ("<pid>_<vid>") and ``path``
    ("<key>_s<slice>"). H = crop rows (axis 0), W = crop axis 1 (anterior-posterior).
    """

    #: the crops carry their own voxel size, grid and VerSe labels; no resize, crop or flips
    IGNORED_OPTIONS = ("preprocess", "load_size", "crop_size", "no_flip", "label_scheme", "spacing_mm")

    PLANE = "sagittal"

    @classmethod
    def modify_commandline_options(cls, parser: argparse.ArgumentParser, is_train: bool):
        g = parser.add_argument_group(f"dataset aligned_{cls.PLANE}")
        g.add_argument(
            "--crop_cache_dir",
            default=None,
            help="keep decoded crops and CAM maps as memory-mapped .npy files here (data larger than memory)",
        )
        g.add_argument(
            "--min_area_mm2",
            type=float,
            default=50.0,
            help="a slice is used when the target covers this much on it; smaller target pieces are ignored",
        )
        g.add_argument(
            "--hole_margin_mm",
            type=float,
            default=HOLE_MARGIN_MM,
            help="a target taller than the hole gets a hole of its height plus this",
        )
        g.add_argument(
            "--slice_fraction",
            type=float,
            default=0.8,
            help="training slices come from this central share of the target's extent",
        )
        parser.set_defaults(plane=cls.PLANE)
        return parser

    def __init__(self, opt: argparse.Namespace):
        super().__init__(opt)
        self.plane = self.PLANE
        if getattr(opt, "plane", self.plane) != self.plane:
            log.warning("--plane %s ignored: aligned_%s slices %s", opt.plane, self.plane, self.plane)
        # the run's opt.json records the plane its slices were cut in (the 3D synthesis reads it)
        opt.plane = self.plane
        if not opt.dataroot:
            raise InputError("--dataroot is required (the folder holding CT/ and label/, or its root)")
        self.store = CropStore(opt.dataroot, need_ct=True, cache_dir=getattr(opt, "crop_cache_dir", None))
        self.phase = getattr(opt, "phase", "train")
        self.random_slices = self.phase == "train" and bool(getattr(opt, "isTrain", self.phase == "train"))
        self.seed = int(getattr(opt, "seed", 0))
        self.mask_height_mm = float(getattr(opt, "mask_height_mm", 40.0))
        self.hole_margin_mm = float(getattr(opt, "hole_margin_mm", HOLE_MARGIN_MM))
        self.min_area_mm2 = float(getattr(opt, "min_area_mm2", 50.0))
        self.slice_fraction = float(getattr(opt, "slice_fraction", 0.8))
        if not 0 < self.slice_fraction <= 1:
            raise InputError(f"--slice_fraction must be in (0, 1], got {self.slice_fraction}")
        if self.mask_height_mm <= 0:
            raise InputError(f"--mask_height_mm must be positive, got {self.mask_height_mm}")

        json_path = self._vertebra_json(opt)
        splits = read_split(json_path)
        self.normal_max_grade = int(getattr(opt, "normal_max_grade", 0))
        vert_class = getattr(opt, "vert_class", "normal")
        if vert_class not in VERT_CLASSES:
            raise InputError(f"--vert_class {vert_class!r}: use {' | '.join(VERT_CLASSES)}")
        self.grades: dict[str, int] = {}
        for entries in splits.values():
            self.grades.update(entries)
        self.normal_ids: dict[str, set[int]] = {}
        for key, grade in self.grades.items():
            if grade <= self.normal_max_grade:
                pid, vid = split_key(key)
                self.normal_ids.setdefault(pid, set()).add(vid)

        phase_entries = splits.get(self.phase) or {}
        if not phase_entries:
            raise input_error(json_path, f"split {self.phase!r} is empty or missing")
        wanted = [
            k
            for k, g in sorted(phase_entries.items())
            if vert_class == "all" or (g <= self.normal_max_grade) == (vert_class == "normal")
        ]
        available = set(self.store.keys())
        missing = [k for k in wanted if k not in available]
        if missing:
            log.warning(
                "%d of %d %s vertebrae of split %r have no crop in %s (e.g. %s); skipped",
                len(missing),
                len(wanted),
                vert_class,
                self.phase,
                self.store.folder,
                ", ".join(missing[:3]),
            )
        self.keys = [k for k in wanted if k in available]
        if not self.keys:
            raise input_error(
                json_path,
                f"split {self.phase!r} has no {vert_class} vertebrae (grade "
                f"{'<=' if vert_class == 'normal' else '>'} {self.normal_max_grade} unless 'all') "
                f"with a crop in {self.store.folder}",
            )

        self.cam_folder = Path(opt.cam_folder) if getattr(opt, "cam_folder", None) else None
        if self.cam_folder is not None:
            if not self.cam_folder.is_dir():
                raise input_error(self.cam_folder, "--cam_folder is not a folder")
            absent = [k for k in self.keys if not self._cam_path(k).is_file()]
            if absent:
                raise input_error(
                    self._cam_path(absent[0]),
                    f"CAM map not found ({len(absent)} of {len(self.keys)} missing); "
                    "run Attention/grad_CAM_3d_sagittal.py or leave out --cam_folder for zero maps",
                )
        else:
            _log_zero_cam_once()
        self._meta: dict[str, VertebraSlices] = {}
        self._cams: dict[str, np.ndarray] = {}
        # The epoch, in shared memory so loader workers (persistent or not) see set_epoch().
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    # --- options and files ------------------------------------------------------------------
    def _vertebra_json(self, opt: argparse.Namespace) -> Path:
        if getattr(opt, "vertebra_json", None):
            return Path(opt.vertebra_json)
        folder = self.store.folder
        for candidate in (folder.parent / "vertebra_data.json", folder / "vertebra_data.json"):
            if candidate.is_file():
                return candidate
        raise input_error(
            self.store.folder.parent / "vertebra_data.json", "split file not found; pass --vertebra_json"
        )

    def _cam_path(self, key: str) -> Path:
        assert self.cam_folder is not None
        return self.cam_folder / f"{key}.nii.gz"

    # --- epochs -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Training slice draws depend on (seed, epoch, index); call before each epoch."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    # --- per-vertebra data ------------------------------------------------------------------
    def grade(self, key: str) -> int:
        return int(self.grades[key])

    def vertebra_slices(self, key: str) -> VertebraSlices:
        """Valid slices, weights and hole size of vertebra ``key`` (computed once, cached)."""
        meta = self._meta.get(key)
        if meta is None:
            meta = self._compute_slices(self.store.load(key))
            self._meta[key] = meta
        return meta

    def _compute_slices(self, crop: Crop) -> VertebraSlices:
        spacing = crop.spacing_mm
        row_mm = float(spacing[0])
        col_mm = float(spacing[1] if self.plane == "sagittal" else spacing[2])
        min_px = self.min_area_mm2 / (row_mm * col_mm)
        _, label_path = self.store.paths(crop.key)
        try:
            central, centre, n = vs.slice_range(crop.label, crop.vid, self.plane, self.slice_fraction)
        except ValueError as exc:
            raise input_error(label_path, f"{exc}; the crop does not show its own vertebra") from exc
        slices, fragmented = self._valid(crop, central, min_px)
        if slices.size == 0:
            everything, _, _ = vs.slice_range(crop.label, crop.vid, self.plane, 1.0)
            slices, fragmented = self._valid(crop, everything, min_px)
        if slices.size == 0:
            raise input_error(
                label_path,
                f"vertebra {crop.vid} covers less than --min_area_mm2 {self.min_area_mm2:g} mm² "
                f"on every {self.plane} slice",
            )
        counts = np.bincount(np.asarray(crop.label).ravel(), minlength=256)  # uint8 ids; faster than unique
        present = [v for v in np.flatnonzero(counts).tolist() if v and is_vertebra(v)]
        upper, lower = neighbours(crop.vid, present) if is_vertebra(crop.vid) else (None, None)
        return VertebraSlices(
            slices=slices,
            weights=vs.slice_weights(slices, centre),
            centre=centre,
            n=n,
            central=int(slices[np.argmin(np.abs(slices - centre))]),
            row_spacing_mm=row_mm,
            hole_rows=max(1, vs.rows_for_mm(self.mask_height_mm, row_mm)),
            margin_rows=vs.rows_for_mm(self.hole_margin_mm, row_mm),
            min_component_px=min_px,
            fragmented=frozenset(int(z) for z in fragmented),
            upper=int(upper or 0),
            lower=int(lower or 0),
        )

    def _valid(self, crop: Crop, slices: np.ndarray, min_px: float) -> tuple[np.ndarray, np.ndarray]:
        """The slices where the target covers ``min_px`` pixels (small pieces ignored), and those
        of them where small pieces exist (only those need cleaning per sample)."""
        stack = vs.take_slices(crop.label, slices, self.plane) == crop.vid
        raw = stack.sum(axis=(1, 2))
        area = vs.clean_mask(stack, min_px).sum(axis=(1, 2))
        ok = area >= max(min_px, 1)
        return slices[ok], slices[ok & (area != raw)]

    def cam_volume(self, key: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray | None:
        """The CAM map of ``key`` as float16 (cached), or ``None`` without ``--cam_folder``."""
        if self.cam_folder is None:
            return None
        cam = self._cams.get(key)
        if cam is None:
            cam = self._load_cam(key, shape, affine)
            self._cams[key] = cam
        return cam

    def _load_cam(self, key: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        cache = self.store.cache_dir
        path = self._cam_path(key)
        # named after the map's file (path, size, time): another --cam_folder's map, or one
        # rewritten since, is never served from the cache
        tag = source_tag(path)
        npy = cache / f"{key}_{tag}_cam.npy" if cache is not None else None
        if npy is not None and npy.exists():
            return np.load(npy, mmap_mode="r")
        cam = read_cam(path, shape, affine).astype(np.float16)
        if npy is not None:
            from util.atomic import atomic_path

            npy.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(npy) as tmp, open(tmp, "wb") as f:
                np.save(f, cam)
            prune_cache(cache, key, tag, ("cam",))  # the map's versions before it was rewritten
        return cam

    # --- samples ----------------------------------------------------------------------------
    def choose_slice(self, index: int, meta: VertebraSlices) -> int:
        """The slice of item ``index``: a seeded triangular draw in training, else the centre."""
        if not self.random_slices:
            return meta.central
        return vs.draw_slice(meta.slices, meta.weights, vs.seeded_unit(self.seed, self.epoch, index))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        key = self.keys[index]
        crop = self.store.load(key)
        meta = self.vertebra_slices(key)
        s = self.choose_slice(index, meta)
        ct = vs.take_slices(crop.ct, s, self.plane)
        label = vs.take_slices(crop.label, s, self.plane)
        cam_volume = self.cam_volume(key, crop.label.shape, crop.affine)
        cam = None if cam_volume is None else vs.take_slices(cam_volume, s, self.plane)
        width = crop.label.shape[1]
        col_start, col_stop = 0, width
        if ct.shape[1] != width:  # coronal: H x LR, padded centred to the sagittal width
            ct, col_start, col_stop = vs.pad_columns(ct, width, 0)
            label, _, _ = vs.pad_columns(label, width, 0)
            if cam is not None:
                cam, _, _ = vs.pad_columns(cam, width, 0)
        sample = vs.build_sample(
            ct,
            label,
            crop.vid,
            meta.hole_rows,
            self.normal_ids.get(crop.pid, ()),
            cam,
            margin_rows=meta.margin_rows,
            min_component_px=meta.min_component_px if s in meta.fragmented else 0,
        )
        out: dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()}
        ratio = float(vs.slice_ratio(s, meta.centre, meta.n))
        out["slice_ratio"] = torch.tensor([ratio], dtype=torch.float32)
        out["row_spacing_mm"] = torch.tensor([meta.row_spacing_mm], dtype=torch.float32)
        for name, value in (
            ("grade", self.grade(key)),
            ("slice_index", s),
            ("col_start", col_start),
            ("col_stop", col_stop),
            ("upper_vid", meta.upper),
            ("lower_vid", meta.lower),
        ):
            out[name] = torch.tensor([int(value)], dtype=torch.int64)
        out["key"] = key
        out["path"] = f"{key}_s{s}"
        return out


def _log_zero_cam_once() -> None:
    global _ZERO_CAM_LOGGED
    if not _ZERO_CAM_LOGGED:
        _ZERO_CAM_LOGGED = True
        log.warning("no --cam_folder: the attention (CAM) channel is a zero map for every sample")

"""Straightened crops: find them, decode them once, keep them decoded.

A straightened folder holds ``CT/<pid>_<vid>.nii.gz`` (uint8, HU window mapped to 0-255) and
``label/<pid>_<vid>.nii.gz`` (VerSe ids, de-pedicled), one pair per vertebra, axes (height
superior->inferior, anterior->posterior, right->left). Every reader of crops (datasets, the
attention classifier, synthesis, evaluation) goes through :class:`CropStore`, so an epoch never
re-reads ``.nii.gz``: decoded arrays are kept in memory, or with ``cache_dir`` as ``.npy`` files
that are memory-mapped (for datasets larger than memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.nifti_io import _read, read_header, spatial_shape, voxel_sizes
from util.atomic import read_json, write_json
from util.errors import InputError, input_error, one_line

log = logging.getLogger(__name__)

CROP_SUFFIX = ".nii.gz"
# Written by train.py into a run's folder: the grids of the crops it was trained on.
TRAIN_CROPS_FILE = "train_crops.json"
CROP_CACHE_SUFFIXES = ("label", "ct", "affine")  # the .npy files the disk cache keeps per crop


@dataclass(frozen=True)
class Crop:
    """One vertebra's straightened crop."""

    key: str  # "<pid>_<vid>"
    pid: str
    vid: int
    label: np.ndarray  # uint8 VerSe ids, (height, AP, LR)
    ct: np.ndarray | None  # uint8 0-255, same grid; None for label-only data
    affine: np.ndarray  # voxel -> world (mm)

    @property
    def spacing_mm(self) -> np.ndarray:
        return voxel_sizes(self.affine)


@dataclass(frozen=True)
class CropGeometry:
    """A crop's grid: voxels per axis and voxel size (mm), axes (height, AP, LR)."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]

    @property
    def extent_mm(self) -> tuple[float, ...]:
        return tuple(round(n * s, 2) for n, s in zip(self.shape, self.spacing_mm, strict=True))

    def describe(self) -> str:
        """E.g. '96 x 64 x 32 voxels of 2 x 2 x 2 mm (192 x 128 x 64 mm)'."""
        voxels = " x ".join(str(n) for n in self.shape)
        spacing = " x ".join(f"{s:g}" for s in self.spacing_mm)
        extent = " x ".join(f"{e:g}" for e in self.extent_mm)
        return f"{voxels} voxels of {spacing} mm ({extent} mm)"

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "spacing_mm": list(self.spacing_mm)}

    @classmethod
    def from_dict(cls, record: dict) -> CropGeometry:
        shape, spacing = record["shape"], record["spacing_mm"]
        if len(shape) != 3 or len(spacing) != 3:
            raise ValueError(f"a crop geometry needs 3 sizes and 3 spacings, got {record}")
        return cls(tuple(int(n) for n in shape), tuple(float(v) for v in spacing))

    def differs_from(self, other: CropGeometry, tolerance: float = 0.1) -> bool:
        """True if the voxel size or the field of view differs by more than ``tolerance`` (relative)
        on any axis: a run then sees anatomy at another scale, or with other context, than it learnt."""
        for a, b in (
            *zip(self.spacing_mm, other.spacing_mm, strict=True),
            *zip(self.extent_mm, other.extent_mm, strict=True),
        ):
            if abs(a - b) > tolerance * max(abs(a), abs(b), 1e-9):
                return True
        return False


def straightened_dir(dataroot: str | os.PathLike) -> Path:
    """The folder holding ``CT/`` and ``label/``: ``dataroot`` itself, or its ``straightened/``."""
    root = Path(dataroot)
    if (root / "label").is_dir() or (root / "CT").is_dir():
        return root
    if (root / "straightened" / "label").is_dir():
        log.info("%s holds no label/ folder; using %s", root, root / "straightened")
        return root / "straightened"
    raise input_error(root, "no straightened crops: expected label/ and CT/ here or under straightened/")


def crop_key(pid: str, vid: int) -> str:
    return f"{pid}_{int(vid)}"


def _keys_in(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {
        p.name[: -len(CROP_SUFFIX)]
        for p in folder.iterdir()
        if p.name.endswith(CROP_SUFFIX) and not p.name.startswith(".")
    }


class CropStore:
    """The crops of one straightened folder, decoded on first use and cached.

    Args:
        dataroot: the straightened folder, or a dataset root holding ``straightened/``.
        need_ct: only list crops that have both CT and label (False: label crops are enough).
        cache_dir: keep decoded arrays as memory-mapped ``.npy`` files here instead of in memory.
    """

    def __init__(self, dataroot: str | os.PathLike, need_ct: bool = True, cache_dir: str | None = None):
        self.folder = straightened_dir(dataroot)
        self.need_ct = need_ct
        self.cache_dir = Path(cache_dir) if cache_dir else None
        labels = _keys_in(self.folder / "label")
        cts = _keys_in(self.folder / "CT")
        self._keys = sorted(labels & cts if need_ct else labels)
        self._cache: dict[str, Crop] = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in set(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def paths(self, key: str) -> tuple[Path, Path]:
        """(CT path, label path) of a crop."""
        return self.folder / "CT" / f"{key}{CROP_SUFFIX}", self.folder / "label" / f"{key}{CROP_SUFFIX}"

    def load(self, key: str) -> Crop:
        """The decoded crop ``key`` ("<pid>_<vid>")."""
        crop = self._cache.get(key)
        if crop is None:
            crop = self._decode(key)
            self._cache[key] = crop
        return crop

    def geometry(self, key: str) -> CropGeometry:
        """The grid of crop ``key`` from its label's header (nothing decoded)."""
        _, label_path = self.paths(key)
        img = read_header(label_path, "label crop")
        shape = spatial_shape(img.shape)
        spacing = tuple(round(float(v), 4) for v in voxel_sizes(img.affine))
        if len(shape) != 3 or min(shape) < 1 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise input_error(label_path, f"not a 3D crop: shape {tuple(shape)}, voxel size {spacing} mm")
        return CropGeometry(shape, spacing)

    def release(self, key: str) -> None:
        """Forget a decoded crop (a reader that visits each crop once keeps its memory flat)."""
        self._cache.pop(key, None)

    # --- decoding ---------------------------------------------------------------------------
    def _decode(self, key: str) -> Crop:
        pid, _, vid = key.rpartition("_")
        if not pid or not vid.isdigit():
            raise input_error(self.folder, f"crop name {key!r} is not '<pid>_<vertebra id>'")
        ct_path, label_path = self.paths(key)
        cached = self._from_disk_cache(key)
        if cached is not None:
            label, ct, affine = cached
        else:
            label_raw, affine = _read(label_path, "label crop")
            label = _as_uint8(label_raw, label_path)
            ct = None
            if self.need_ct or ct_path.exists():
                ct_raw, ct_affine = _read(ct_path, "CT crop")
                if ct_raw.shape != label.shape:
                    raise input_error(
                        ct_path, f"shape {ct_raw.shape} differs from its label crop {label.shape}"
                    )
                if not np.allclose(ct_affine, affine, atol=1e-3):
                    raise input_error(ct_path, "affine differs from its label crop")
                ct = _as_uint8(ct_raw, ct_path)
            self._to_disk_cache(key, label, ct, affine)
        return Crop(key, pid, int(vid), label, ct, affine)

    def _cache_tag(self, key: str) -> str:
        """The name of ``key``'s cache files: a digest of the very files they are decoded from
        (their path, size and modification time), so a crop rewritten since (its CT or its label),
        or the same name in another dataset sharing the cache folder, never gets another's arrays."""
        return source_tag(*reversed(self.paths(key)))

    def _cache_files(self, key: str) -> tuple[Path, ...]:
        """``key``'s cache files, one per :data:`CROP_CACHE_SUFFIXES`."""
        assert self.cache_dir is not None
        tag = self._cache_tag(key)
        return tuple(self.cache_dir / f"{key}_{tag}_{suffix}.npy" for suffix in CROP_CACHE_SUFFIXES)

    def _from_disk_cache(self, key: str):
        if self.cache_dir is None:
            return None
        label_f, ct_f, aff_f = self._cache_files(key)
        if not (label_f.exists() and aff_f.exists()):
            return None
        ct = np.load(ct_f, mmap_mode="r") if ct_f.exists() else None
        if self.need_ct and ct is None:
            return None
        return np.load(label_f, mmap_mode="r"), ct, np.load(aff_f)

    def _to_disk_cache(self, key: str, label: np.ndarray, ct: np.ndarray | None, affine: np.ndarray) -> None:
        if self.cache_dir is None:
            return
        from util.atomic import atomic_path

        label_f, ct_f, aff_f = self._cache_files(key)
        for path, arr in ((label_f, label), (ct_f, ct), (aff_f, affine)):
            if arr is None:
                continue
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, arr)
        # what the cache held of this crop's files before they were rewritten
        prune_cache(self.cache_dir, key, self._cache_tag(key), CROP_CACHE_SUFFIXES)


def source_tag(*paths: str | os.PathLike) -> str:
    """A short digest of files' resolved paths, sizes and modification times (an absent file
    counts as absent): the name under which a cache keeps what was decoded from them.

    16 hex digits: the first 8 digest the paths alone (:func:`cache_siblings` finds by them what
    a cache holds of older versions of the same files), the last 8 their sizes and times."""
    where, when = hashlib.sha1(), hashlib.sha1()
    for path in paths:
        path = Path(path)
        where.update(str(path.resolve()).encode() + b"\n")
        try:
            st = path.stat()
            when.update(f"{st.st_size}|{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            when.update(b"absent\n")
    return where.hexdigest()[:8] + when.hexdigest()[:8]


# {cache folder: {(key, path digest): its file names}}: each folder is listed once per process, so
# writing an entry does not list the whole folder again (a dataset's first epoch would be
# quadratic in its crops); what this process writes is added as it goes
_CACHE_LISTINGS: dict[Path, dict[tuple[str, str], list[str]]] = {}


def _cache_listing(folder: Path) -> dict[tuple[str, str], list[str]]:
    listing = _CACHE_LISTINGS.get(folder)
    if listing is None:
        listing = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                parts = entry.name.rsplit("_", 2)  # <key>_<tag>_<suffix>.npy
                if len(parts) == 3 and len(parts[1]) == 16 and parts[2].endswith(".npy"):
                    listing.setdefault((parts[0], parts[1][:8]), []).append(entry.name)
        _CACHE_LISTINGS[folder] = listing
    return listing


def cache_siblings(folder: Path, key: str, tag: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The cache files ``<key>_<tag'>_<suffix>.npy`` in ``folder`` decoded from the same files as
    ``tag`` (same paths) in another version (other sizes or times): what a rewrite of a crop or
    map leaves behind. Entries of other datasets sharing the folder (other paths) are not among
    them."""
    names = _cache_listing(folder).get((key, tag[:8]), [])
    ends = {f"_{suffix}.npy" for suffix in suffixes}
    return [folder / n for n in names if n[len(key) + 1 :][:16] != tag and n[len(key) + 17 :] in ends]


def prune_cache(folder: Path, key: str, tag: str, suffixes: tuple[str, ...]) -> None:
    """Delete :func:`cache_siblings` (a reader holding one memory-mapped keeps its data); the
    entry ``tag`` just written is what the folder holds of these files now."""
    for path in cache_siblings(folder, key, tag, suffixes):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    _cache_listing(folder)[(key, tag[:8])] = [f"{key}_{tag}_{suffix}.npy" for suffix in suffixes]


def _as_uint8(data: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(data)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise input_error(path, "crop contains NaN or infinite values")
        arr = np.rint(arr)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 255:
        raise input_error(path, f"values outside 0-255 ({arr.min()}..{arr.max()}); not a straightened crop")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_cam(path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """An attention (CAM) map of a crop, float32 in [0, 1]; training and synthesis read it alike.

    InputError naming ``path`` when it is not on the crop's grid (shape or affine), holds NaN or
    infinite values, or lies outside [0, 1] (a map scaled to 0-255 is rejected, never clipped)."""
    data, cam_affine = _read(path, "CAM map")
    cam = np.asarray(data, dtype=np.float32)
    if cam.shape != tuple(shape):
        raise input_error(path, f"shape {cam.shape} differs from its crop {tuple(shape)}")
    if not np.allclose(cam_affine, affine, atol=1e-3):
        raise input_error(path, "affine differs from its crop's (not on the crop's grid)")
    if not np.all(np.isfinite(cam)):
        raise input_error(path, "CAM map contains NaN or infinite values")
    if cam.min() < -1e-3 or cam.max() > 1 + 1e-3:
        raise input_error(path, f"values outside [0, 1] ({cam.min():.3g}..{cam.max():.3g})")
    return np.clip(cam, 0.0, 1.0)


def save_like(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, descrip: str | None = None
) -> None:
    """Write an array on a crop's grid (atomic, uint8 kept, float as float32; ``descrip`` into
    the header's description)."""
    from data.nifti_io import save_nifti

    dtype = np.uint8 if array.dtype == np.uint8 else np.float32
    save_nifti(path, array, affine, dtype=dtype, descrip=descrip)


def crop_grids(store: CropStore, keys) -> dict[CropGeometry, int]:
    """Each distinct grid among the crops ``keys`` and how many have it (headers only)."""
    counts: dict[CropGeometry, int] = {}
    for key in dict.fromkeys(keys):
        geometry = store.geometry(key)
        counts[geometry] = counts.get(geometry, 0) + 1
    return counts


def record_grids(store: CropStore, keys, run_dir: str | os.PathLike) -> None:
    """Write ``run_dir/train_crops.json``: the grids of a run's training crops, most common first."""
    counts = sorted(crop_grids(store, keys).items(), key=lambda kv: -kv[1])
    write_json(
        Path(run_dir) / TRAIN_CROPS_FILE, {"geometries": [{**g.as_dict(), "crops": n} for g, n in counts]}
    )


def grid_warnings(store: CropStore, keys, run_dirs: dict[str, Path]) -> list[str]:
    """One warning per run and crop grid its training crops did not have.

    ``run_dirs``: {run name: its folder}; a run without ``train_crops.json`` (trained before the
    record existed) is not checked, and an unreadable record gives a warning of its own. A run
    given crops of another field of view or voxel size sees other context around the hole than it
    learnt: the demo's run, given 256 mm crops instead of its 192 x 128 x 64 mm, drew empty bodies.
    """
    found = None
    lines = []
    for name, run_dir in run_dirs.items():
        path = Path(run_dir) / TRAIN_CROPS_FILE
        if not path.is_file():
            continue
        try:
            trained = [
                CropGeometry.from_dict(g) for g in read_json(path, "training crop grids")["geometries"]
            ]
        except (InputError, KeyError, TypeError, ValueError) as exc:  # advisory: the work goes on
            lines.append(f"warning: {path}: not a list of crop grids ({one_line(str(exc))}); not checked")
            continue
        if not trained:
            continue
        found = crop_grids(store, keys) if found is None else found
        for geometry, n in found.items():
            if all(geometry.differs_from(t) for t in trained):
                extent, spacing = trained[0].extent_mm, trained[0].spacing_mm
                lines.append(
                    f"warning: {n} crop(s) here are {geometry.describe()}; run {name!r} was trained on "
                    f"{trained[0].describe()}. Its results may be unusable: straighten with --crop_mm "
                    f"{' '.join(f'{e:g}' for e in extent)} --spacing_mm {spacing[0]:g} to match"
                )
    return lines


def dataset_crops(dataset) -> tuple[CropStore, list[str]] | None:
    """(store, keys) of a dataset of straightened crops (the aligned datasets), else None."""
    store, keys = getattr(dataset, "store", None), getattr(dataset, "keys", None)
    return (store, list(keys)) if isinstance(store, CropStore) and keys else None


__all__ = [
    "TRAIN_CROPS_FILE",
    "Crop",
    "CropGeometry",
    "CropStore",
    "crop_grids",
    "crop_key",
    "dataset_crops",
    "grid_warnings",
    "read_cam",
    "record_grids",
    "prune_cache",
    "save_like",
    "source_tag",
    "straightened_dir",
]

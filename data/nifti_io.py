"""NIfTI input and output for CT volumes and vertebra masks.

Everything geometric goes through the affine: volumes are reoriented to one canonical axis order
(:data:`CANONICAL_AXCODES`, the order of the straightened crops: axis 0 towards inferior, axis 1
towards posterior, axis 2 towards left) and resampled to a spacing in mm, linear for CT and
nearest for labels. Loading checks the things that go wrong with real data and raises
:class:`~util.errors.InputError` naming the file: missing, unreadable or corrupt files, NaNs,
non-integer or empty masks, and CT/mask pairs that do not share a grid.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt
from scipy import ndimage

from data import label_schemes
from util.atomic import atomic_path
from util.errors import InputError, input_error

log = logging.getLogger(__name__)

CANONICAL_AXCODES = ("I", "P", "L")
# Affines of a CT and its mask must agree to this many mm (headers written by different tools
# differ in the last float digits).
AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Volume:
    """A 3D array with its voxel-to-world (RAS+, mm) affine and the file it came from."""

    array: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along each array axis."""
        return voxel_sizes(self.affine)

    @property
    def axcodes(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.affine))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (norms of the affine's columns)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _short(exc: BaseException, path: Path) -> str:
    """The exception's message on one line, without the path (the error names it already)."""
    text = str(exc) or type(exc).__name__
    for name in (repr(str(path)), str(path), repr(path.name), path.name):
        text = text.replace(name, "the file")
    return " ".join(text.split())


@contextlib.contextmanager
def _file_errors(path: Path, what: str) -> Iterator[None]:
    """Failures to read a NIfTI file as one-line InputErrors naming it."""
    try:
        yield
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise input_error(path, f"corrupt or truncated gzip data ({_short(exc, path)})") from exc
    except nib.filebasedimages.ImageFileError as exc:
        raise input_error(path, f"not a readable NIfTI image ({_short(exc, path)})") from exc
    except Exception as exc:  # any other failure to decode (header errors, memory) is the file's
        problem = f"unreadable {what} file ({type(exc).__name__}: {_short(exc, path)})"
        raise input_error(path, problem) from exc


def read_header(path: str | os.PathLike, what: str) -> nib.spatialimages.SpatialImage:
    """The image of ``path`` with its header read and its data not decoded (InputError naming the
    file when it is missing, not a file, or not a readable NIfTI image)."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, f"{what} file not found")
    if not path.is_file():
        raise input_error(path, f"{what} path is not a file")
    with _file_errors(path, what):
        return nib.load(str(path))


def header_text(path: str | os.PathLike, what: str) -> str:
    """The description field of a NIfTI header (what wrote the file, in our outputs), up to its
    first NUL; an InputError as :func:`read_header` for a missing or unreadable file."""
    raw = read_header(path, what).header["descrip"].tobytes().split(b"\0")[0]
    return raw.decode(errors="replace")


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An image shape without trailing axes of length 1 beyond the third (a 3D volume saved 4D)."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read(path: str | os.PathLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    img = read_header(path, what)
    with _file_errors(path, what):
        data = np.asanyarray(img.dataobj)
    data = data.reshape(spatial_shape(data.shape))
    if data.ndim != 3:
        raise input_error(path, f"expected a 3D {what}, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise input_error(path, "header has an invalid (singular or non-finite) affine")
    return data, affine


def load_ct(path: str | os.PathLike) -> Volume:
    """Load a CT volume in HU as float32."""
    data, affine = _read(path, "CT")
    ct = np.asarray(data, dtype=np.float32)
    bad = ~np.isfinite(ct)
    if bad.any():
        raise input_error(path, f"CT contains {int(bad.sum())} NaN or infinite voxels")
    return Volume(ct, affine, Path(path))


def read_labels(path: str | os.PathLike) -> Volume:
    """Load an integer label map of any label set, ids kept exactly.

    Float masks are rounded to integers (they must hold integers, and are never read through
    float32, which rounds ids above 2**24); negative, NaN and non-integer values are refused,
    naming the file. The ids come back as uint8 when they fit, else int64.
    """
    data, affine = _read(path, "mask")
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise input_error(path, "mask contains NaN or infinite values")
        rounded = np.rint(data)
        if np.abs(data - rounded).max(initial=0.0) > 1e-3:
            raise input_error(path, "mask holds non-integer values; expected integer labels")
        data = rounded
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise input_error(path, f"mask has data type {data.dtype}; expected integer labels")
    if data.min(initial=0) < 0:
        raise input_error(path, "mask holds negative labels")
    if data.max(initial=0) > np.iinfo(np.int64).max:
        raise input_error(path, f"mask holds a label too large to be an id ({data.max():.4g})")
    labels = np.asarray(data).astype(np.int64 if data.max(initial=0) > 255 else np.uint8)
    return Volume(labels, affine, Path(path))


def load_mask(path: str | os.PathLike, label_scheme: str = "verse") -> Volume:
    """Load a vertebra mask as uint8 VerSe ids.

    The ids are read by :func:`read_labels`, then mapped from ``label_scheme``; ids the scheme
    does not know are set to background with a warning naming them, or refused when another
    scheme explains them (``--label_scheme`` is wrong). Any id up to 2**63 is handled without a
    table of that size.
    """
    volume = read_labels(path)
    labels, affine = volume.array, volume.affine
    try:
        mapped = label_schemes.to_verse(labels, label_scheme)
    except KeyError as exc:
        raise input_error(path, exc.args[0] if exc.args else str(exc)) from exc
    message, fatal = label_schemes.unknown_ids_report(label_schemes.unique_ids(labels), label_scheme)
    if fatal:
        raise input_error(path, message)
    if message:
        log.warning("%s: %s", path, message)
    if not any(label_schemes.is_vertebra(v) for v in label_schemes.unique_ids(mapped)):
        raise input_error(path, f"mask has no vertebra labels (label scheme {label_scheme!r})")
    return Volume(mapped, affine, Path(path))


def check_same_grid(ct: Volume, mask: Volume) -> None:
    """Raise if a CT and its mask do not share shape and affine."""
    if ct.shape != mask.shape:
        raise InputError(f"{mask.path}: mask shape {mask.shape} does not match CT {ct.path} shape {ct.shape}")
    if not np.allclose(ct.affine, mask.affine, atol=AFFINE_TOLERANCE_MM, rtol=0):
        raise InputError(
            f"{mask.path}: mask affine does not match CT {ct.path} affine "
            f"(largest difference {np.abs(ct.affine - mask.affine).max():.4g} mm)"
        )


def load_case(
    ct_path: str | os.PathLike | None, mask_path: str | os.PathLike, label_scheme: str = "verse"
) -> tuple[Volume | None, Volume]:
    """Load a CT (optional, ``None`` for mask-only cases) and its mask, checking they share a grid."""
    mask = load_mask(mask_path, label_scheme)
    if ct_path is None:
        return None, mask
    ct = load_ct(ct_path)
    check_same_grid(ct, mask)
    return ct, mask


def reorient(volume: Volume, axcodes: tuple[str, str, str] = CANONICAL_AXCODES) -> Volume:
    """Permute and flip the array axes so that they point along ``axcodes``; the affine follows."""
    current = ornt.io_orientation(volume.affine)
    target = ornt.axcodes2ornt(axcodes)
    transform = ornt.ornt_transform(current, target)
    array = ornt.apply_orientation(volume.array, transform)
    affine = volume.affine @ ornt.inv_ornt_aff(transform, volume.array.shape)
    return Volume(np.ascontiguousarray(array), affine, volume.path)


def resample(volume: Volume, spacing_mm: float | tuple[float, float, float], order: int) -> Volume:
    """Resample to a new voxel size along the current array axes (order 1 for CT, 0 for labels).

    The first voxel centre stays where it is and the new grid covers the same extent.
    """
    new = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    if np.any(new <= 0):
        raise ValueError(f"spacing must be positive, got {spacing_mm}")
    old = volume.spacing
    scale = new / old
    shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(volume.shape, old, new, strict=True))
    if np.allclose(scale, 1.0) and shape == volume.shape:
        return Volume(volume.array.copy(), volume.affine.copy(), volume.path)
    array = ndimage.affine_transform(
        volume.array, scale, output_shape=shape, order=order, mode="nearest", prefilter=False
    )
    affine = volume.affine.copy()
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(scale)
    return Volume(array, affine, volume.path)


def world_to_voxel(affine: np.ndarray, points_mm: np.ndarray) -> np.ndarray:
    """Map world points (..., 3) in mm to continuous voxel indices (..., 3)."""
    inv = np.linalg.inv(affine)
    return np.asarray(points_mm) @ inv[:3, :3].T + inv[:3, 3]


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices (..., 3) to world points in mm."""
    return np.asarray(ijk, dtype=np.float64) @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]


def sample_world(
    array: np.ndarray, affine: np.ndarray, points_mm: np.ndarray, order: int, cval: float = 0.0
) -> np.ndarray:
    """Sample ``array`` at world points (..., 3) through its affine; outside the volume gives ``cval``."""
    points_mm = np.asarray(points_mm, dtype=np.float64)
    ijk = world_to_voxel(affine, points_mm.reshape(-1, 3)).T
    out = ndimage.map_coordinates(array, ijk, order=order, mode="grid-constant", cval=cval, prefilter=False)
    return out.reshape(points_mm.shape[:-1])


def resample_to_grid(
    array: np.ndarray,
    affine: np.ndarray,
    out_affine: np.ndarray,
    out_shape: tuple[int, int, int],
    order: int,
    cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """Resample ``array`` onto another grid given by its affine (any rotation, any voxel size).

    Order 1 for CT, 0 for labels. ``mode="constant"``: points outside the input get ``cval``;
    ``mode="nearest"``: they take the value of the nearest edge voxel (for an input grid that
    covers the output's extent only up to rounding, such as one made by :func:`resample`).
    """
    if mode not in ("constant", "nearest"):
        raise ValueError(f"mode must be 'constant' or 'nearest', got {mode!r}")
    to_input = np.linalg.inv(affine) @ out_affine
    return ndimage.affine_transform(
        array,
        to_input[:3, :3],
        offset=to_input[:3, 3],
        output_shape=tuple(out_shape),
        order=order,
        mode="grid-constant" if mode == "constant" else "nearest",
        cval=cval,
        prefilter=False,
    )


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    dtype: type | np.dtype | None = None,
    xform_code: int = 1,
    descrip: str | None = None,
) -> Path:
    """Save atomically with the affine in both sform and qform (``xform_code`` 1 = scanner, 2 = aligned)."""
    array = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_sform(affine, code=xform_code)
    img.set_qform(affine, code=xform_code)
    img.header.set_xyzt_units("mm")
    if descrip:
        img.header["descrip"] = descrip.encode()[:79]
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path

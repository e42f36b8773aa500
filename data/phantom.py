"""Synthetic spine CT phantom with known pre-fracture anatomy.

    python -m data.phantom --out DIR --patients N --seed S [--spacing_mm 1.0] [--levels T10-L5]
                           [--fracture_fraction 0.3] [--workers 1] [--straight] [--overwrite]
                           [--truncate cranial,caudal,lateral] [--slice_mm 3] [--bevel_mm 5]
                           [--tilt_deg 6] [--oblique_deg 5] [--lumbosacral_deg 20]
                           [--axial_rotation_deg 30] [--osteophyte_mm 5] [--quirks]

Each patient is a curved spine (kyphosis, lordosis, sometimes a mild scoliosis) of vertebrae
with a cortical shell, a textured cancellous interior, concave endplates and posterior elements,
discs, a spinal canal, soft tissue, organs, air outside the body and CT noise. Some vertebrae
carry Genant grade 1-3 compression fractures (wedge, biconcave or crush). The same patient is
written twice: fractured (the data) and before the fracture (the truth). The partially visible
vertebra above the first level (and below the last, or the sacrum below L5) is drawn too, as a
real scan shows it.

Outputs (DESIGN.md "Data contracts"):

    DIR/raw/<pid>/<pid>.nii.gz, <pid>_msk.nii.gz, <pid>.json        CT in HU, VerSe labels, centroids
    DIR/vertebra_data.json                                          {split: {"<pid>_<vid>": grade}}
    DIR/truth/<pid>/<pid>_healthy.nii.gz, <pid>_healthy_msk.nii.gz  the patient before any fracture
    DIR/truth/<pid>/<pid>_body_msk.nii.gz                           raw mask restricted to the bodies
    DIR/truth/<pid>/<pid>_geometry.json                             each vertebra's centre and frame
    DIR/truth/vertebrae.csv                                         heights, grade, fracture type

``vertebra_data.json`` is written last: it marks a finished dataset. Writing a dataset first
removes that marker and every phantom patient (``raw/phantomNNN``, ``truth/phantomNNN``) already
in DIR, so a smaller dataset written over a larger one keeps none of the old patients.

Fractures compress a body between its neighbours, which stay where they are: the space given up
fills with disc tissue, so the healthy and fractured volumes differ only at fractured bodies.
The same seed gives the same bytes; patient i depends only on (seed, i).

Quirks of real scans (:class:`Quirks`, each a flag, all off by default) reproduce where real
scans fail, with their truth: field-of-view truncation (cranial, caudal, lateral; the truth csv
says which full levels are then cut: ``complete``/``reason``, and they get no grade), thick
slices (1 x 1 x 3 mm), bevelled anterior rims, and bodies tilted against the spine curve
(``tilt_to_curve_deg`` in the geometry json), an oblique affine (the grid turned against the
world axes), a steep L5/S1 junction, a patient turned about the spine's long axis, each
vertebra turned a little more (``--axial_rotation_deg``; ``patient_turn_deg`` and each vertebra's
``axial_rotation_deg`` in the geometry json), and anterior osteophytes (bony lips of the
vertebra's label at the endplate rims; ``osteophyte_mm`` in the geometry json; no body height, so
the truth is unchanged). Transitional anatomy comes from ``--levels``: a missing level
(``T10,T11,L1,L2,L3,L4,L5``), six lumbar vertebrae (``T10-L5,L6``: L6, VerSe 25, above the
sacrum) or thirteen thoracic ones (``T11,T12,T13,L1-L5``: T13, VerSe 28, between T12 and L1).

The truth heights are the one definition (:mod:`evaluation.heights`) on the analytic geometry:
the endplate frame from planes fitted to the analytic endplates (a wedge fracture turns it), then
the columns along it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from data import label_schemes
from data.nifti_io import save_nifti
from data.phantom_anatomy import (
    FRACTURE_TYPES,
    Fracture,
    VertebraShape,
    anchor_sizes,
    level_position,
    local_axes,
    rotation,
)
from evaluation.heights import (
    BodyHeights,
    central_planes,
    endplate_normal,
    genant_from_heights,
    height_reduction,
    heights_from_columns,
)
from straighten.centroids import label_centroids, vertebra_completeness, write_centroids
from straighten.curve import axis_rotation
from util.atomic import write_json, write_text
from util.errors import InputError

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "pid",
    "vid",
    "grade",
    "fracture_type",
    "healthy_anterior_mm",
    "healthy_middle_mm",
    "healthy_posterior_mm",
    "fractured_anterior_mm",
    "fractured_middle_mm",
    "fractured_posterior_mm",
    "complete",
    "reason",
)
# Target largest height reduction per Genant grade, kept away from the grade boundaries.
GRADE_TARGETS = {1: (0.21, 0.24), 2: (0.27, 0.38), 3: (0.43, 0.55)}
GRADE_PROBS = (0.35, 0.40, 0.25)
TYPE_PROBS = (0.5, 0.3, 0.2)
TRUTH_STEP_MM = 0.25
# A body's endplate frame turned less than this from its own h axis keeps the h axis (exactly
# the columns of a healthy, symmetric body).
TRUTH_MIN_TILT_DEG = 0.01
# Bisection steps that set a fracture's amplitude (to 0.8 / 2**24, far below a voxel).
FRACTURE_BISECTIONS = 24
FOV_LR_MM = 220.0
# The narrow lateral field of view of the ``lateral`` truncation quirk (cuts transverse processes).
LATERAL_FOV_MM = 80.0
TRUNCATIONS = ("cranial", "caudal", "lateral")


@dataclass(frozen=True)
class Quirks:
    """Quirks of real scans, each a flag with its truth; all off draws the same bytes as before.

    Attributes:
        truncate: field-of-view cuts: ``cranial`` / ``caudal`` through the middle of the first /
            last full level's body, ``lateral`` to ``LATERAL_FOV_MM`` around the spine. A full
            level whose true body mask loses voxels to a cut is incomplete in the truth.
        slice_mm: slices this thick along the scanner's z (e.g. 3 for 1 x 1 x 3 mm): CT averaged
            over the slab, labels from its middle slice; a multiple of the spacing (an even
            multiple averages one slice more, the two end ones at half weight, so that the slab
            has a middle slice).
        bevel_mm: bevelled anterior rims: each endplate drops up to this much (mm) over the last
            4-7 mm before the anterior wall.
        tilt_deg: each body tilted (sagittal) by up to this much relative to the spine curve.
        oblique_deg: the scan's grid turned by up to this much about its left-right and
            anterior-posterior axes (an oblique affine; the slices of ``slice_mm`` follow the grid).
            The rendered volumes are resampled onto it (CT linear, labels nearest neighbour).
        lumbosacral_deg: a steep lumbosacral junction: the sacrum turned by 70-100 % of this much
            more lordosis against L5 (a wedge-shaped L5/S1 disc; L5's own shape is unchanged).
        axial_rotation_deg: the whole patient turned about the scanner's z axis (the spine's long
            axis) through the spine's centre by 50-100 % of this much, either way, on the same
            axis-aligned grid (CT linear, labels nearest neighbour; z planes map onto themselves),
            and each vertebra turned about its own height axis by up to a quarter of it more (a
            rotated scoliotic vertebra). Heights do not change; the world axes in the geometry
            json turn with the anatomy.
        osteophyte_mm: anterior osteophytes: on about half the endplates, a bony lip of the
            vertebra's label growing 50-100 % of this much (mm) out of the anterior rim (on a
            third of the levels round the lateral rims too). No body height: the truth is unchanged.
    """

    truncate: tuple[str, ...] = ()
    slice_mm: float = 0.0
    bevel_mm: float = 0.0
    tilt_deg: float = 0.0
    oblique_deg: float = 0.0
    lumbosacral_deg: float = 0.0
    axial_rotation_deg: float = 0.0
    osteophyte_mm: float = 0.0

    @classmethod
    def all_on(cls, slice_mm: float = 0.0) -> Quirks:
        return cls(TRUNCATIONS, slice_mm, 5.0, 6.0)


@dataclass
class Disc:
    centre: np.ndarray
    axes: np.ndarray
    A: float
    W: float
    half_height: float
    shape: VertebraShape  # borrows the cross-section of the vertebra above


@dataclass
class Patient:
    pid: str
    spacing: float
    shapes: list[VertebraShape]  # cranial to caudal, partial ends included
    full_levels: list[int]
    discs: list[Disc]
    origin: np.ndarray
    shape: tuple[int, int, int]
    torso: dict
    organs: dict
    intensities: dict
    gas: list[tuple[np.ndarray, np.ndarray]]
    turn_deg: float = 0.0  # the whole patient turned about the world z axis (axial rotation quirk)

    @property
    def affine(self) -> np.ndarray:
        aff = np.diag([self.spacing] * 3 + [1.0])
        aff[:3, 3] = self.origin
        return aff


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------


def _curvature_angles(rng: np.random.Generator, straight: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sagittal and coronal tangent angles (deg) as functions of level position."""
    p = np.arange(0.0, 26.01, 0.01)
    kyph, lord = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4)
    kappa = np.where(p < 7.5, -6.0 * lord, np.where(p < 19.5, 3.6 * kyph, -10.0 * lord))
    kappa = ndimage.gaussian_filter1d(kappa, 60)  # blend the regions over about a level
    scoliotic = rng.random() < 0.35
    amp, period, phase = (
        rng.uniform(1.5, 4.0) * rng.choice([-1, 1]),
        rng.uniform(8, 14),
        rng.uniform(0, 2 * np.pi),
    )
    kappa_c = amp * np.sin(2 * np.pi * p / period + phase) if scoliotic else np.zeros_like(p)
    if straight:
        kappa, kappa_c = np.zeros_like(p), np.zeros_like(p)
    step = p[1] - p[0]
    alpha = np.cumsum(kappa) * step
    beta = np.cumsum(kappa_c) * step
    return p, alpha, beta


def truth_heights(shape: VertebraShape, fractured: bool) -> BodyHeights:
    """The body's heights by the one definition (:mod:`evaluation.heights`) on its analytic columns.

    Step 1, the frame: the height axis is the bisector of the normals of the endplate planes
    (:func:`evaluation.heights.endplate_normal` on the analytic surfaces). A healthy body is
    symmetric, so that is its own h axis; a fractured one, a wedge above all, tilts it (about
    the LR axis: the fractures are symmetric left to right), and the columns are then taken along
    the tilted axis (:func:`tilted_columns`). Steps 2-4 on those columns.
    """
    a, r, top, bot = shape.column_grid(TRUTH_STEP_MM, fractured)
    cols = bot - top
    inside = np.isfinite(cols) & (cols > 0)
    aa, rr = np.meshgrid(a, r, indexing="ij")
    normal = endplate_normal(top[inside], bot[inside], aa[inside], rr[inside])
    tilt = float(np.arctan2(normal[1], normal[0]))  # towards +a; its LR part is nil by symmetry
    if abs(tilt) <= np.radians(TRUTH_MIN_TILT_DEG):
        return heights_from_columns(cols, ap_spacing_mm=TRUTH_STEP_MM)
    # turned about LR, the planes stay where they were: turn only the central ones (step 2)
    band = central_planes(inside.any(axis=0))
    cols = tilted_columns(a, top[:, band], bot[:, band], tilt, TRUTH_STEP_MM)
    return heights_from_columns(cols, lr_fraction=1.0, ap_spacing_mm=TRUTH_STEP_MM)


def tilted_columns(
    a: np.ndarray, top: np.ndarray, bot: np.ndarray, tilt_rad: float, step_mm: float
) -> np.ndarray:
    """Column extents along an axis turned by ``tilt_rad`` from h towards +a, on a grid of the
    turned AP axis (``step_mm``), of a body given by its columns (``top``/``bot``: (AP, LR), NaN
    outside, at AP positions ``a``). Each sagittal plane of the body is a polygon (its top
    surface, then its bottom surface back); a turned column's extent runs from its first to its
    last crossing of the polygon's edges. Returns (turned AP, LR) heights, NaN where empty."""
    c, s = np.cos(tilt_rad), np.sin(tilt_rad)
    u_all = []
    polygons = []
    for k in range(top.shape[1]):
        inside = np.isfinite(top[:, k]) & (bot[:, k] > top[:, k])
        edges = []
        for run in np.split(np.flatnonzero(inside), np.flatnonzero(np.diff(np.flatnonzero(inside)) > 1) + 1):
            if run.size == 0:
                continue
            h = np.r_[top[run, k], bot[run[::-1], k], top[run[0], k]]
            ap = np.r_[a[run], a[run[::-1]], a[run[0]]]
            t, u = h * c + ap * s, -h * s + ap * c  # along the turned height and AP axes
            edges.append(np.c_[u[:-1], t[:-1], u[1:], t[1:]])
            u_all.append(u)
        polygons.append(np.concatenate(edges) if edges else np.zeros((0, 4)))
    if not u_all:
        return np.full((1, top.shape[1]), np.nan)
    u_all = np.concatenate(u_all)
    grid = np.arange(np.floor(u_all.min() / step_mm), np.ceil(u_all.max() / step_mm) + 1) * step_mm
    out = np.full((grid.size, top.shape[1]), np.nan)
    for k, e in enumerate(polygons):
        if not len(e):
            continue
        u0, t0, u1, t1 = (e[:, i][None, :] for i in range(4))
        g = grid[:, None]
        crosses = ((u0 - g) * (u1 - g) <= 0) & (u0 != u1)
        t = t0 + (g - u0) * (t1 - t0) / np.where(u0 != u1, u1 - u0, 1.0)
        hi = np.where(crosses, t, -np.inf).max(axis=1)
        lo = np.where(crosses, t, np.inf).min(axis=1)
        out[:, k] = np.where(hi > lo, hi - lo, np.nan)
    return out


def _fracture_for(shape: VertebraShape, target: float, kind: str) -> Fracture:
    """A fracture of ``kind`` whose largest region reduction equals ``target`` (bisection)."""
    healthy = truth_heights(shape, fractured=False)
    lo, hi = 0.0, 0.8
    fracture = Fracture(kind, 0.0)
    shape.fracture = fracture
    for _ in range(FRACTURE_BISECTIONS):
        fracture.amplitude = 0.5 * (lo + hi)
        got = float(np.max(height_reduction(healthy, truth_heights(shape, fractured=True))))
        if got < target:
            lo = fracture.amplitude
        else:
            hi = fracture.amplitude
    return fracture


def end_elements(levels: list[int]) -> tuple[int | None, int | None]:
    """The partial vertebrae drawn above and below the full ``levels`` (None: none): the nearest
    standard element (C3 and below, the sacrum), so T12 above T13, L1 below T13, S below L5 or L6."""
    standard = [*label_schemes.STANDARD_SEQUENCE[2:], label_schemes.SACRUM]
    rank = label_schemes.spine_rank
    above = [v for v in standard if rank(v) < rank(levels[0])]
    below = [v for v in standard if rank(v) > rank(levels[-1])]
    return (above[-1] if above else None), (below[0] if below else None)


def build_patient(
    pid: str,
    rng: np.random.Generator,
    levels: list[int],
    spacing: float,
    fracture_fraction: float,
    straight: bool = False,
    quirks: Quirks | None = None,
    quirk_rng: np.random.Generator | None = None,
) -> Patient:
    """Draw one patient's anatomy (all random choices, in a fixed order; the quirks draw from
    ``quirk_rng`` so that the anatomy without them stays the same)."""
    cranial, caudal = end_elements(levels)
    elements = ([cranial] if cranial else []) + list(levels) + ([caudal] if caudal else [])

    size = rng.uniform(0.92, 1.08)
    p_grid, alpha_p, beta_p = _curvature_angles(rng, straight)
    positions = np.array([level_position(v) for v in elements])
    full = np.array([v in levels for v in elements])
    alpha = np.interp(positions, p_grid, alpha_p)
    beta = np.interp(positions, p_grid, beta_p)
    if quirks is not None and quirks.lumbosacral_deg > 0 and elements[-1] == label_schemes.SACRUM:
        qrng = quirk_rng if quirk_rng is not None else np.random.default_rng(0)
        alpha[-1] -= quirks.lumbosacral_deg * qrng.uniform(0.7, 1.0)  # lordosis: alpha falls caudally
    tilt = 0.0 if straight else rng.uniform(-4, 4)
    alpha_off = alpha[full].mean() - tilt
    beta_off = beta[full].mean()

    shapes: list[VertebraShape] = []
    for vid, p, al, be in zip(elements, positions, alpha, beta, strict=True):
        s = anchor_sizes(min(p, 24.0))
        jit = rng.uniform(0.97, 1.03, size=3)
        is_sacrum = vid == label_schemes.SACRUM
        lumbar = p >= 20  # T13 (19.5) wedges like a thoracic level
        wedge = (
            rng.uniform(-0.10, 0.0)
            if p >= 24
            else (rng.uniform(-0.06, 0.04) if lumbar else rng.uniform(0.0, 0.12))
        )
        shape = VertebraShape(
            vid=int(vid),
            centre=np.zeros(3),
            axes=local_axes(al - alpha_off, be - beta_off),
            H=(30.0 if is_sacrum else s["H"]) * size * jit[0],
            A=s["depth"] / 2 * size * jit[1] * (1.05 if is_sacrum else 1.0),
            W=s["width"] / 2 * size * jit[2] * (1.1 if is_sacrum else 1.0),
            wedge=0.0 if is_sacrum else wedge,
            endplate_depth=rng.uniform(0.8, 1.6),
            waist=rng.uniform(0.04, 0.10),
            rim=rng.uniform(1.0, 2.0),
            kidney=rng.uniform(0.05, 0.12),
            exponent=rng.uniform(2.2, 2.8),
            canal_a=s["canal_ap"] / 2 * rng.uniform(0.9, 1.1),
            canal_r=s["canal_lr"] / 2 * rng.uniform(0.9, 1.1),
            pedicle=s["pedicle"] * rng.uniform(0.9, 1.1),
            lamina=rng.uniform(4.5, 6.5),
            sp_len=s["sp_len"] * rng.uniform(0.85, 1.15),
            sp_angle=s["sp_angle"] + rng.uniform(-5, 5),
            sp_height=float(np.interp(p, [19, 21], [9.0, 16.0])),
            sp_width=float(np.interp(p, [19, 21], [6.0, 8.0])),
            tp_len=s["tp_len"] * rng.uniform(0.85, 1.15),
            tp_angle=s["tp_angle"],
            disc_below=s["disc"] * size * rng.uniform(0.85, 1.15),
            sacrum=is_sacrum,
        )
        shape.make_texture(rng)
        shapes.append(shape)
    for upper, lower in zip(shapes[:-1], shapes[1:], strict=True):
        lower.disc_above = upper.disc_below
    if quirks is not None and (quirks.bevel_mm > 0 or quirks.tilt_deg > 0):
        qrng = quirk_rng if quirk_rng is not None else np.random.default_rng(0)
        for shape, al, be in zip(shapes, alpha, beta, strict=True):
            if shape.sacrum:
                continue
            shape.bevel = quirks.bevel_mm * qrng.uniform(0.6, 1.0)
            shape.bevel_depth = qrng.uniform(4.0, 7.0)
            shape.tilt_to_curve = qrng.uniform(-quirks.tilt_deg, quirks.tilt_deg)
            shape.axes = local_axes(al - alpha_off + shape.tilt_to_curve, be - beta_off)

    if quirks is not None and quirks.osteophyte_mm > 0:
        # a stream of its own: the other quirks draw the same with or without osteophytes
        seeds = (quirk_rng if quirk_rng is not None else np.random.default_rng(0)).bit_generator.seed_seq
        orng = np.random.default_rng(seeds.spawn(1)[0])
        for shape in shapes:
            draw = orng.random(5)
            if shape.sacrum:
                continue
            reach = quirks.osteophyte_mm * (0.5 + 0.5 * draw[2:4])
            shape.osteophyte_superior = float(reach[0]) if draw[0] < 0.5 else 0.0
            shape.osteophyte_inferior = float(reach[1]) if draw[1] < 0.5 else 0.0
            shape.osteophyte_arc_deg = 110.0 if draw[4] < 1 / 3 else 50.0

    # Stack the bodies along their tangents, then centre the full levels on the origin.
    for i in range(1, len(shapes)):
        up, lo = shapes[i - 1], shapes[i]
        t_disc = local_axes(
            *(0.5 * (np.array([alpha[i - 1], beta[i - 1]]) + [alpha[i], beta[i]]) - [alpha_off, beta_off])
        )[0]
        lo.centre = up.centre + up.H / 2 * up.axes[0] + up.disc_below * t_disc + lo.H / 2 * lo.axes[0]
    shift = np.mean([s.centre for s, f in zip(shapes, full, strict=True) if f], axis=0)
    for s in shapes:
        s.centre = s.centre - shift

    discs = []
    for i in range(len(shapes) - 1):
        up, lo = shapes[i], shapes[i + 1]
        bottom = up.centre + up.H / 2 * up.axes[0]
        top = lo.centre - lo.H / 2 * lo.axes[0]
        axes = local_axes(
            *(0.5 * (np.array([alpha[i], beta[i]]) + [alpha[i + 1], beta[i + 1]]) - [alpha_off, beta_off])
        )
        discs.append(
            Disc(
                0.5 * (bottom + top),
                axes,
                min(up.A, lo.A),
                min(up.W, lo.W),
                0.5 * float(np.linalg.norm(top - bottom)) + 3.0,
                up,
            )
        )

    # Fractures: more likely at the thoracolumbar junction (T11-L2).
    weights = np.array([1.6 if 18 <= level_position(v) <= 21 else 0.8 for v in levels])
    probs = np.clip(fracture_fraction * weights / weights.mean(), 0.0, 0.95)
    draws = rng.random(len(levels))
    grades = rng.choice([1, 2, 3], size=len(levels), p=GRADE_PROBS)
    kinds = rng.choice(FRACTURE_TYPES, size=len(levels), p=TYPE_PROBS)
    targets = rng.random(len(levels))
    by_vid = {s.vid: s for s in shapes}
    for k, vid in enumerate(levels):
        if draws[k] < probs[k]:
            lo_t, hi_t = GRADE_TARGETS[int(grades[k])]
            _fracture_for(by_vid[vid], lo_t + targets[k] * (hi_t - lo_t), str(kinds[k]))

    # Field of view: cut through the partial end vertebrae, keep every full level whole.
    ends = []
    for s in shapes:
        corners = np.array(np.meshgrid(*s.local_box(), indexing="ij")).reshape(3, -1).T
        world = s.centre + corners @ s.axes
        ends.append((world[:, 2].min(), world[:, 2].max()))
    full_shapes = [s for s, f in zip(shapes, full, strict=True) if f]
    z_hi = max(e[1] for e, f in zip(ends, full, strict=True) if f) + 4.0
    z_lo = min(e[0] for e, f in zip(ends, full, strict=True) if f) - 4.0
    if cranial:
        z_hi = min(z_hi, shapes[0].centre[2] - 0.2 * shapes[0].H)
        z_hi = max(z_hi, full_shapes[0].centre[2] + full_shapes[0].H / 2 + full_shapes[0].disc_above + 2.0)
    if caudal:
        z_lo = max(
            z_lo, shapes[-1].centre[2] + (0.0 if caudal == label_schemes.SACRUM else 0.2) * shapes[-1].H
        )
        z_lo = min(z_lo, full_shapes[-1].centre[2] - full_shapes[-1].H / 2 - full_shapes[-1].disc_below - 2.0)

    reach = max(s.canal_centre + s.canal_a + s.lamina + s.sp_len for s in full_shapes)
    back = min(s.centre[1] for s in full_shapes) - reach - rng.uniform(25, 45)
    ry, rx = rng.uniform(110, 135), rng.uniform(140, 175)
    torso = {"x": 0.0, "y": back + ry, "rx": rx, "ry": ry, "fat": rng.uniform(8, 25), "exponent": 2.2}
    lo_corner = np.array([-FOV_LR_MM / 2, back - 15.0, z_lo])
    hi_corner = np.array([FOV_LR_MM / 2, back + 2 * ry + 15.0, z_hi])
    n = tuple(int(np.ceil((h - lo) / spacing)) + 1 for lo, h in zip(lo_corner, hi_corner, strict=True))

    by_level = {level_position(s.vid): s for s in shapes}
    lumbar_z = [s.centre[2] for s in shapes if 20 <= level_position(s.vid) <= 22]
    kidney_z = float(np.mean(lumbar_z)) if lumbar_z else full_shapes[-1].centre[2]
    organs = {
        "aorta_hu": float(rng.choice([40.0, 200.0])),
        "kidney_z": kidney_z,
        "lung_base_z": by_level[20].centre[2] + by_level[20].H / 2 if 20 in by_level else z_lo - 100.0,
        "liver_z": (by_level[18].centre[2] if 18 in by_level else z_hi + 40.0),
    }
    intensities = {
        "cortical": rng.uniform(700, 1000),
        "cancellous": rng.uniform(120, 260),
        "texture": rng.uniform(40, 80),
        "posterior": rng.uniform(350, 550),
        "noise": rng.uniform(8, 18),
    }
    gas = []
    for _ in range(int(rng.integers(3, 7))):
        centre = np.array(
            [rng.uniform(-80, 80), torso["y"] + rng.uniform(10, 0.7 * ry), rng.uniform(z_lo, z_hi)]
        )
        gas.append((centre, rng.uniform(6, 18, size=3)))
    return Patient(
        pid, float(spacing), shapes, list(levels), discs, lo_corner, n, torso, organs, intensities, gas
    )


# ---------------------------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------------------------


class _Canvas:
    """World grid of one patient and the arrays painted on it."""

    def __init__(self, patient: Patient):
        self.p = patient
        self.coords = [patient.origin[k] + patient.spacing * np.arange(patient.shape[k]) for k in range(3)]
        self.hu = np.full(patient.shape, -1000.0, dtype=np.float32)
        self.labels = np.zeros(patient.shape, dtype=np.uint8)
        self.body = np.zeros(patient.shape, dtype=bool)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
        sl = []
        for k in range(3):
            i0 = max(int(np.floor((lo[k] - self.p.origin[k]) / self.p.spacing)), 0)
            i1 = min(int(np.ceil((hi[k] - self.p.origin[k]) / self.p.spacing)) + 1, self.p.shape[k])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def local(self, centre: np.ndarray, axes: np.ndarray, local_box: np.ndarray):
        """Slices of the grid covering ``local_box`` and the (h, a, r) coordinates of its voxels."""
        corners = np.array(np.meshgrid(*local_box, indexing="ij")).reshape(3, -1).T
        world = centre + corners @ axes
        sl = self.box(world.min(axis=0), world.max(axis=0))
        if sl is None:
            return None
        d = [(self.coords[k][sl[k]] - centre[k]).astype(np.float32) for k in range(3)]
        dx, dy, dz = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        h, a, r = (dx * ax[0] + dy * ax[1] + dz * ax[2] for ax in axes.astype(np.float32))
        return sl, h, a, r

    def xy(self, sl=(slice(None), slice(None))):
        return self.coords[0][sl[0]][:, None].astype(np.float32), self.coords[1][sl[1]][None, :].astype(
            np.float32
        )


def _ellipsoid(canvas: _Canvas, centre, radii, value: float, within: np.ndarray | None = None) -> None:
    centre, radii = np.asarray(centre, float), np.asarray(radii, float)
    sl = canvas.box(centre - radii, centre + radii)
    if sl is None:
        return
    d = [((canvas.coords[k][sl[k]] - centre[k]) / radii[k]).astype(np.float32) for k in range(3)]
    inside = d[0][:, None, None] ** 2 + d[1][None, :, None] ** 2 + d[2][None, None, :] ** 2 <= 1.0
    if within is not None:
        inside &= within[sl]
    canvas.hu[sl][inside] = value


def _spine_track(patient: Patient, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x, y of the vertebral body centres interpolated at heights ``z``."""
    c = np.array([s.centre for s in patient.shapes])
    order = np.argsort(c[:, 2])
    return np.interp(z, c[order, 2], c[order, 0]), np.interp(z, c[order, 2], c[order, 1])


def _tube(canvas: _Canvas, dx: float, dy: float, rx, ry, value: float, z_range=None, within=None) -> None:
    """An elliptic tube following the spine at offset (dx, dy); radii may be callables of z."""
    z = canvas.coords[2]
    ks = np.flatnonzero(
        np.ones_like(z, dtype=bool) if z_range is None else (z >= z_range[0]) & (z <= z_range[1])
    )
    if ks.size == 0:
        return
    zsel = z[ks[0] : ks[-1] + 1]
    cx, cy = _spine_track(canvas.p, zsel)
    cx, cy = cx + dx, cy + dy
    rxs = rx(zsel) if callable(rx) else np.full_like(zsel, rx)
    rys = ry(zsel) if callable(ry) else np.full_like(zsel, ry)
    lo = np.array([cx.min() - rxs.max(), cy.min() - rys.max(), zsel[0]])
    hi = np.array([cx.max() + rxs.max(), cy.max() + rys.max(), zsel[-1]])
    sl = canvas.box(lo, hi)
    if sl is None:
        return
    sl = (sl[0], sl[1], slice(ks[0], ks[-1] + 1))
    x, y = canvas.xy(sl)
    inside = ((x[..., None] - cx) / rxs) ** 2 + ((y[..., None] - cy) / rys) ** 2 <= 1.0
    if within is not None:
        inside &= within[sl]
    canvas.hu[sl][inside] = value


def _paint_background(canvas: _Canvas, rng: np.random.Generator) -> None:
    p, t = canvas.p, canvas.p.torso
    x, y = canvas.xy()
    e = t["exponent"]
    outer = (np.abs(x - t["x"]) / t["rx"]) ** e + (np.abs(y - t["y"]) / t["ry"]) ** e <= 1.0
    inner = (np.abs(x - t["x"]) / (t["rx"] - t["fat"])) ** e + (
        np.abs(y - t["y"]) / (t["ry"] - t["fat"])
    ) ** e <= 1.0
    base = np.where(inner, 35.0, np.where(outer, -100.0, -1000.0)).astype(np.float32)
    canvas.hu[:] = base[:, :, None]
    inner3 = np.broadcast_to(inner[:, :, None], p.shape)

    # visceral fat mottling inside the abdomen
    coarse = max(2, int(round(6.0 / p.spacing)))
    small = rng.standard_normal(tuple(n // coarse + 2 for n in p.shape)).astype(np.float32)
    field = ndimage.zoom(ndimage.gaussian_filter(small, 1.6), coarse, order=1)[
        : p.shape[0], : p.shape[1], : p.shape[2]
    ]
    fat = inner3 & (field > 0.25 * field.std())
    canvas.hu[fat] = -90.0

    z_bottom = min(s.centre[2] for s in p.shapes)
    lumbar = [s for s in p.shapes if 20 <= level_position(s.vid) <= 24.5]
    mean_a = float(np.mean([s.A for s in p.shapes]))
    mean_w = float(np.mean([s.W for s in p.shapes]))
    # organs
    _ellipsoid(canvas, (70.0, t["y"] + 15, p.organs["liver_z"]), (75, 85, 95), 60.0, inner3)
    for side in (-1, 1):
        _ellipsoid(canvas, (side * 60.0, -5.0, p.organs["kidney_z"]), (24, 30, 55), 35.0, inner3)
        _ellipsoid(canvas, (side * 60.0, -5.0, p.organs["kidney_z"]), (8, 12, 30), -40.0, inner3)
    _tube(canvas, -18.0, mean_a + 14.0, 11.0, 11.0, p.organs["aorta_hu"], within=inner3)
    _tube(canvas, 22.0, mean_a + 10.0, 13.0, 9.0, 45.0, within=inner3)
    # muscles: paraspinal along the whole spine, psoas growing towards the pelvis
    z_l1 = max(s.centre[2] for s in lumbar) if lumbar else None

    def psoas_radius(z: np.ndarray, grow: float) -> np.ndarray:
        return 6 + grow * np.clip((z_l1 - z) / 120, 0, 1)

    for side in (-1, 1):
        _tube(canvas, side * 26.0, -(mean_a + 38.0), 20.0, 24.0, 55.0, within=inner3)
        if lumbar:
            _tube(
                canvas,
                side * (mean_w + 12.0),
                0.0,
                lambda z: psoas_radius(z, 18.0),
                lambda z: psoas_radius(z, 14.0),
                50.0,
                (z_bottom - 50, z_l1),
                inner3,
            )
    # lungs above the diaphragm, with domed bases
    for side in (-1, 1):
        _ellipsoid(canvas, (side * 95.0, 5.0, p.organs["lung_base_z"] + 140), (60, 70, 140), -850.0, inner3)
    for centre, radii in p.gas:
        _ellipsoid(canvas, centre, radii, -900.0, inner3)


def _paint_discs(canvas: _Canvas) -> None:
    for d in canvas.p.discs:
        box = np.array([[-d.half_height, d.half_height], [-d.A, d.A], [-d.W, d.W]])
        got = canvas.local(d.centre, d.axes, box)
        if got is None:
            continue
        sl, h, a, r = got
        shape = d.shape
        rho = ((np.abs(a) / d.A) ** shape.exponent + (np.abs(r) / d.W) ** shape.exponent) ** (
            1 / shape.exponent
        )
        inside = (rho <= 1.0) & (np.abs(h) <= d.half_height)
        canvas.hu[sl][inside] = (70.0 + 30.0 * rho)[inside]


def _paint_canals(canvas: _Canvas) -> None:
    for s in canvas.p.shapes:
        box = np.array(
            [
                [-(s.H + s.disc_above) / 2 - 1, (s.H + s.disc_below) / 2 + 1],
                [s.wall - 1, s.canal_centre + s.canal_a + 1],
                [-s.canal_r - 1, s.canal_r + 1],
            ]
        )
        got = canvas.local(s.centre, s.axes, box)
        if got is None:
            continue
        sl, h, a, r = got
        canvas.hu[sl][s.canal(h, a, r)] = 15.0


def _paint_vertebra(canvas: _Canvas, s: VertebraShape, fractured: bool, posterior: bool = True) -> None:
    """Draw posterior elements (optionally) and the body; a fractured body gives its lost space to disc."""
    got = canvas.local(s.centre, s.axes, s.local_box())
    if got is None:
        return
    sl, h, a, r = got
    hu, lab, body = canvas.hu[sl], canvas.labels[sl], canvas.body[sl]
    ints = canvas.p.intensities
    label = s.vid
    if posterior:
        post = s.posterior(h, a, r)
        core = ndimage.binary_erosion(post, iterations=max(1, int(round(1.2 / canvas.p.spacing))))
        hu[post] = ints["cortical"] * 0.85
        hu[core] = ints["posterior"]
        lab[post] = label
        body[post] = False
    rho, top0, bot0, top, bot = s.extent(a, r, fractured)
    inside_xs = rho <= 1.0
    span = np.maximum(bot - top, 1e-3)
    h_healthy = top0 + (h - top) * (bot0 - top0) / span  # where this voxel sat before the fracture
    inside = inside_xs & (h >= top) & (h <= bot)
    scale = s.waist_scale(h_healthy, top0, bot0)
    inside &= s.cross_section(a / scale, r / scale) <= 1.0
    if fractured and s.fracture is not None:
        healthy_body = inside_xs & (h >= top0) & (h <= bot0)
        scale0 = s.waist_scale(h, top0, bot0)
        healthy_body &= s.cross_section(a / scale0, r / scale0) <= 1.0
        lost = healthy_body & ~inside
        # the posterior elements (pedicle bases in the body's corner) do not collapse: where the
        # healthy body covered them they are posterior elements again, drawn as in the healthy pass
        post = s.posterior(h, a, r)
        kept = lost & post
        if kept.any():
            core = ndimage.binary_erosion(post, iterations=max(1, int(round(1.2 / canvas.p.spacing))))
            hu[kept] = np.where(core, ints["posterior"], ints["cortical"] * 0.85)[kept]
            body[kept] = False
        lost &= ~post
        hu[lost] = (70.0 + 30.0 * rho)[lost]
        lab[lost] = 0
        body[lost] = False
    if s.has_osteophytes:
        lips = s.osteophytes(h, a, r, fractured) & ~inside
        if fractured and s.fracture is not None:  # the lips follow their collapsed endplates
            gone = s.osteophytes(h, a, r, False) & ~lips & ~inside
            hu[gone], lab[gone], body[gone] = 40.0, 0, False
        hu[lips], lab[lips], body[lips] = ints["cortical"] * 0.9, label, True
    if not inside.any():
        return
    hb, ab, rb, h0 = h[inside], a[inside], r[inside], h_healthy[inside]
    t0, b0, t, b = top0[inside], bot0[inside], top[inside], bot[inside]
    rho_w = s.cross_section(ab / scale[inside], rb / scale[inside])
    shell = max(1.2, 0.6 * canvas.p.spacing)
    d_edge = np.minimum(np.minimum(hb - t, b - hb), (1.0 - rho_w) * min(s.A, s.W))
    values = ints["cancellous"] + ints["texture"] * s.sample_texture(h0, ab, rb)
    values = np.where(d_edge < shell, ints["cortical"], values)
    if fractured and s.fracture is not None:  # impaction: denser bone under a collapsed endplate
        sup, inf = t - t0, b0 - b
        values += 250.0 * np.clip(sup / 4.0, 0, 1) * (hb - t < 3.0) + 250.0 * np.clip(inf / 4.0, 0, 1) * (
            b - hb < 3.0
        )
    hu[inside] = values
    lab[inside] = label
    body[inside] = not s.sacrum


def render(patient: Patient, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rasterise the healthy and fractured patient; returns HU volumes (int16) and label volumes (uint8)."""
    canvas = _Canvas(patient)
    _paint_background(canvas, rng)
    _paint_discs(canvas)
    _paint_canals(canvas)
    for s in patient.shapes:
        _paint_vertebra(canvas, s, fractured=False)
    healthy_hu, healthy_lab = canvas.hu.copy(), canvas.labels.copy()
    for s in patient.shapes:
        if s.fracture is not None:
            _paint_vertebra(canvas, s, fractured=True, posterior=False)
    noise = rng.standard_normal(patient.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6)
    noise *= patient.intensities["noise"] / (noise.std() + 1e-6)

    def to_hu(x: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(x + noise), -1024, 3071).astype(np.int16)

    return {
        "ct": to_hu(canvas.hu),
        "mask": canvas.labels,
        "body": np.where(canvas.body, canvas.labels, 0).astype(np.uint8),
        "healthy_ct": to_hu(healthy_hu),
        "healthy_mask": healthy_lab,
    }


# ---------------------------------------------------------------------------------------------
# One patient, the whole dataset
# ---------------------------------------------------------------------------------------------


def truth_rows(patient: Patient, cut: dict[int, str] | None = None) -> list[dict]:
    """One truth row per full level: grade, type and heights measured on the analytic geometry,
    and whether the scan shows it whole (``cut``: {vid: reason} of the full levels it does not)."""
    cut = cut or {}
    rows = []
    for s in patient.shapes:
        if s.vid not in patient.full_levels:
            continue
        healthy = truth_heights(s, fractured=False)
        fractured = truth_heights(s, fractured=True) if s.fracture else healthy
        grade = genant_from_heights(healthy, fractured)
        row = _row(patient.pid, s.vid, grade, s.fracture.kind if s.fracture else "none", healthy, fractured)
        row["complete"] = s.vid not in cut
        row["reason"] = cut.get(s.vid, "")
        rows.append(row)
    return rows


def _row(pid: str, vid: int, grade: int, kind: str, healthy: BodyHeights, fractured: BodyHeights) -> dict:
    row = {"pid": pid, "vid": int(vid), "grade": int(grade), "fracture_type": kind}
    for prefix, hts in (("healthy", healthy), ("fractured", fractured)):
        for region, value in hts.as_dict().items():
            row[f"{prefix}_{region}_mm"] = round(float(value), 3)
    return row


def geometry_record(patient: Patient) -> dict:
    return {
        "pid": patient.pid,
        "spacing_mm": patient.spacing,
        "frame": "world RAS mm; axes rows: height (to inferior), AP (to posterior), LR (to left)",
        "vertebrae": [
            {
                "vid": s.vid,
                "name": label_schemes.vertebra_name(s.vid),
                "full": s.vid in patient.full_levels,
                "centre_mm": [round(float(c), 4) for c in s.centre],
                "axes": {
                    k: [round(float(c), 6) for c in s.axes[i]] for i, k in enumerate(("height", "ap", "lr"))
                },
                "body_height_mm": round(s.H, 4),
                "body_depth_mm": round(2 * s.A, 4),
                "body_width_mm": round(2 * s.W, 4),
                "fracture_type": s.fracture.kind if s.fracture else "none",
                "tilt_to_curve_deg": round(float(s.tilt_to_curve), 3),
                "bevel_mm": round(float(s.bevel), 3),
                "axial_rotation_deg": round(float(s.axial_rotation), 3),
                "osteophyte_mm": {
                    "superior": round(float(s.osteophyte_superior), 3),
                    "inferior": round(float(s.osteophyte_inferior), 3),
                    "arc_deg": round(float(s.osteophyte_arc_deg), 1) if s.has_osteophytes else 0.0,
                },
            }
            for s in patient.shapes
        ],
        "patient_turn_deg": round(float(patient.turn_deg), 3),
    }


def oblique_grid(
    vols: dict[str, np.ndarray], affine: np.ndarray, angles_deg: tuple[float, float]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The volumes resampled on a grid turned by ``angles_deg`` (about x, then y) that holds the
    whole original volume (CT linear with air outside, labels nearest neighbour)."""
    lin = rotation(*angles_deg) @ affine[:3, :3]
    shape = np.array(vols["mask"].shape)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1).T
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    idx = np.linalg.solve(lin, world.T).T  # the corners on the turned grid (up to its origin)
    lo, hi = np.floor(idx.min(axis=0)), np.ceil(idx.max(axis=0))
    out_aff = np.eye(4)
    out_aff[:3, :3] = lin
    out_aff[:3, 3] = lin @ lo
    out_shape = tuple(int(n) for n in hi - lo + 1)
    return _resample_volumes(vols, affine, out_aff, out_shape), out_aff


def _resample_volumes(
    vols: dict[str, np.ndarray], affine: np.ndarray, out_affine: np.ndarray, out_shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Every volume resampled onto another grid: CT linear with air outside, labels nearest neighbour."""
    from data.nifti_io import resample_to_grid

    out = {}
    for name, vol in vols.items():
        order, cval = (1, -1024.0) if name.endswith("ct") else (0, 0.0)
        out[name] = resample_to_grid(vol, affine, out_affine, out_shape, order, cval)
    return out


# The scanner's long axis, towards inferior: the axial rotation quirk turns about it, so a positive
# angle turns the posterior towards the patient's left (as a crop's ``ap_turn_deg``).
INFERIOR = np.array([0.0, 0.0, -1.0])


def turn_vertebrae(patient: Patient, max_deg: float, rng: np.random.Generator) -> None:
    """Each vertebra (not the sacrum) turned about its own height axis by up to ``max_deg``
    (a rotated scoliotic vertebra), before rendering: the AP and LR axes turn, heights stay."""
    for s in patient.shapes:
        if s.sacrum:
            continue
        s.axial_rotation = float(rng.uniform(-max_deg, max_deg))
        s.axes = s.axes @ axis_rotation(s.axes[0], s.axial_rotation).T


def turn_patient(
    vols: dict[str, np.ndarray], patient: Patient, affine: np.ndarray, deg: float
) -> dict[str, np.ndarray]:
    """The rendered patient turned by ``deg`` about the scanner's long axis through the centre of
    its full levels, on the same grid (``affine``); the shapes' centres and axes turn with it."""
    centre = np.mean([s.centre for s in patient.shapes if s.vid in patient.full_levels], axis=0)
    rot = axis_rotation(INFERIOR, deg)
    move = np.eye(4)  # the anatomy's new place: x -> centre + rot (x - centre)
    move[:3, :3] = rot
    move[:3, 3] = centre - rot @ centre
    out = _resample_volumes(vols, move @ affine, affine, vols["mask"].shape)
    for s in patient.shapes:
        s.centre = centre + rot @ (s.centre - centre)
        s.axes = s.axes @ rot.T
    patient.turn_deg = float(deg)
    return out


def apply_fov_quirks(
    vols: dict[str, np.ndarray], patient: Patient, quirks: Quirks, affine: np.ndarray | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """Cut the field of view and thicken the slices; returns (volumes, affine, {vid: reason} of
    the full levels whose true body loses voxels to a cut). Cuts run along the array's axes
    (``affine``: the grid of ``vols``, the patient's own by default)."""
    aff = (patient.affine if affine is None else affine).copy()
    shape = vols["mask"].shape
    keep = [slice(0, n) for n in shape]
    full = [s for s in patient.shapes if s.vid in patient.full_levels]

    def index_of(point: np.ndarray) -> np.ndarray:
        return np.linalg.solve(aff[:3, :3], point - aff[:3, 3])

    i_lo, i_hi = 0, shape[2]
    if "cranial" in quirks.truncate:
        i_hi = int(np.floor(index_of(full[0].centre)[2])) + 1  # RAS: higher index is superior
    if "caudal" in quirks.truncate:
        i_lo = int(np.ceil(index_of(full[-1].centre)[2]))
    keep[2] = slice(max(0, i_lo), min(shape[2], i_hi))
    if "lateral" in quirks.truncate:
        x0 = index_of(np.mean([s.centre for s in full], axis=0))[0]
        half = LATERAL_FOV_MM / 2 / float(np.linalg.norm(aff[:3, 0]))
        keep[0] = slice(max(0, int(np.ceil(x0 - half))), min(shape[0], int(np.floor(x0 + half)) + 1))
    window = tuple(keep)
    cut = {}
    for s in full:
        idx = np.argwhere(vols["body"] == s.vid)
        sides = []
        if (idx[:, 2] >= keep[2].stop).any():
            sides.append("cranial")
        if (idx[:, 2] < keep[2].start).any():
            sides.append("caudal")
        if ((idx[:, 0] < keep[0].start) | (idx[:, 0] >= keep[0].stop)).any():
            sides.append("lateral")
        if sides:
            cut[s.vid] = "body cut by the field of view (" + "/".join(sides) + ")"
    out = {k: v[window] for k, v in vols.items()}
    aff[:3, 3] += aff[:3, :3] @ np.array([sl.start for sl in keep], dtype=np.float64)
    k = int(round(quirks.slice_mm / patient.spacing)) if quirks.slice_mm > 0 else 1
    if k > 1 and k % 2:
        n = out["mask"].shape[2] // k * k
        for name, vol in out.items():
            blocks = vol[:, :, :n].reshape(*vol.shape[:2], n // k, k)
            if name.endswith("ct"):
                out[name] = np.rint(blocks.mean(axis=3)).astype(vol.dtype)
            else:
                out[name] = np.ascontiguousarray(blocks[..., k // 2])
        aff[:3, 3] += aff[:3, 2] * (k - 1) / 2
        aff[:3, 2] *= k
    elif k > 1:
        # An even slab has no middle slice: the CT takes k + 1 slices, the two end ones at half
        # weight (the same thickness), so the slab is centred on slice k / 2, where its label is
        # taken and where the affine puts it.
        weights = np.r_[0.5, np.ones(k - 1), 0.5] / k
        starts = np.arange((out["mask"].shape[2] - 1) // k) * k
        for name, vol in out.items():
            if name.endswith("ct"):
                acc = sum(w * vol[:, :, starts + i].astype(np.float64) for i, w in enumerate(weights))
                out[name] = np.rint(acc).astype(vol.dtype)
            else:
                out[name] = np.ascontiguousarray(vol[:, :, starts + k // 2])
        aff[:3, 3] += aff[:3, 2] * (k // 2)
        aff[:3, 2] *= k
    return out, aff, cut


def generate_patient(
    out: Path,
    index: int,
    seed: int,
    levels: list[int],
    spacing: float,
    fracture_fraction: float,
    straight: bool = False,
    quirks: Quirks | None = None,
) -> list[dict]:
    """Build, render and write patient ``index``; returns its truth rows."""
    pid = f"phantom{index:03d}"
    rng = np.random.default_rng([int(seed), int(index)])
    quirk_rng = np.random.default_rng([int(seed), int(index), 7])
    patient = build_patient(pid, rng, levels, spacing, fracture_fraction, straight, quirks, quirk_rng)
    turn_rng = np.random.default_rng([int(seed), int(index), 11])  # apart: other quirks draw the same
    if quirks is not None and quirks.axial_rotation_deg > 0:
        turn_vertebrae(patient, quirks.axial_rotation_deg / 4, turn_rng)
    vols = render(patient, rng)
    aff, cut = patient.affine, {}
    if quirks is not None and quirks.axial_rotation_deg > 0:
        deg = quirks.axial_rotation_deg * turn_rng.uniform(0.5, 1.0) * turn_rng.choice([-1.0, 1.0])
        vols = turn_patient(vols, patient, aff, float(deg))
    if quirks is not None and quirks.oblique_deg > 0:
        angles = quirk_rng.uniform(0.5, 1.0, 2) * quirks.oblique_deg * quirk_rng.choice([-1.0, 1.0], 2)
        vols, aff = oblique_grid(vols, aff, (float(angles[0]), float(angles[1])))
    if quirks is not None and (quirks.truncate or quirks.slice_mm > 0):
        vols, aff, cut = apply_fov_quirks(vols, patient, quirks, aff)
    raw, truth = out / "raw" / pid, out / "truth" / pid
    save_nifti(raw / f"{pid}.nii.gz", vols["ct"], aff)
    save_nifti(raw / f"{pid}_msk.nii.gz", vols["mask"], aff)
    completeness = vertebra_completeness(vols["mask"], aff)
    write_centroids(raw / f"{pid}.json", label_centroids(vols["mask"], list(completeness)), completeness)
    save_nifti(truth / f"{pid}_healthy.nii.gz", vols["healthy_ct"], aff)
    save_nifti(truth / f"{pid}_healthy_msk.nii.gz", vols["healthy_mask"], aff)
    save_nifti(truth / f"{pid}_body_msk.nii.gz", vols["body"], aff)
    write_json(truth / f"{pid}_geometry.json", geometry_record(patient))
    return truth_rows(patient, cut)


def split_patients(pids: list[str], seed: int) -> dict[str, list[str]]:
    """Split by patient, about 60/20/20, every split non-empty from three patients on."""
    order = [pids[i] for i in np.random.default_rng([int(seed), 2**31 - 1]).permutation(len(pids))]
    n = len(order)
    n_val = max(1, round(0.2 * n)) if n >= 3 else 0
    n_test = max(1, round(0.2 * n)) if n >= 2 else 0
    return {
        "train": sorted(order[: n - n_val - n_test]),
        "val": sorted(order[n - n_val - n_test : n - n_test]),
        "test": sorted(order[n - n_test :]),
    }


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def clear_dataset(out: Path) -> None:
    """Remove what ``generate`` writes to ``out``: the split file first (the finished marker), the
    truth table, and every phantom patient's folder in raw/ and truth/ (``phantomNNN``; anything
    else there is left alone), so that a smaller new dataset keeps none of the old patients."""
    (out / "vertebra_data.json").unlink(missing_ok=True)
    (out / "truth" / "vertebrae.csv").unlink(missing_ok=True)
    for folder in (out / "raw", out / "truth"):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_dir() and re.fullmatch(r"phantom\d{3,}", path.name):
                    shutil.rmtree(path)


def generate(
    out: str | Path,
    patients: int,
    seed: int,
    spacing_mm: float = 1.0,
    levels: str = "T10-L5",
    fracture_fraction: float = 0.3,
    workers: int = 1,
    straight: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    quirks: Quirks | None = None,
) -> list[dict]:
    """Write a phantom dataset to ``out``; returns the truth rows (cut vertebrae get no grade in
    the split file)."""
    out = Path(out)
    if patients < 1:
        raise InputError(f"--patients must be at least 1, got {patients}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if not np.isfinite(spacing_mm) or not 0 < spacing_mm <= 4:
        raise InputError(f"--spacing_mm must be a number in (0, 4], got {spacing_mm}")
    if not 0 <= fracture_fraction <= 1:
        raise InputError(f"--fracture_fraction must be in [0, 1], got {fracture_fraction}")
    try:
        level_ids = label_schemes.parse_levels(levels)
    except (KeyError, ValueError) as exc:
        raise InputError(f"--levels {levels!r}: {exc}") from exc
    bad = [v for v in level_ids if not label_schemes.is_vertebra(v) or not 3 <= level_position(v) <= 24.5]
    if bad:
        raise InputError(f"--levels {levels!r}: the phantom draws C3-L6 (and T13); cannot draw {bad}")
    if (out / "vertebra_data.json").exists() and not overwrite:
        raise InputError(
            f"{out}: already holds a dataset (vertebra_data.json); pass --overwrite to replace it"
        )

    if quirks is not None:
        unknown = sorted(set(quirks.truncate) - set(TRUNCATIONS))
        if unknown:
            raise InputError(f"--truncate: unknown side(s) {unknown}; choose from {list(TRUNCATIONS)}")
        k = quirks.slice_mm / spacing_mm
        if quirks.slice_mm < 0 or (quirks.slice_mm > 0 and abs(k - round(k)) > 1e-6):
            raise InputError(f"--slice_mm must be a multiple of --spacing_mm, got {quirks.slice_mm}")
        if quirks.bevel_mm < 0 or not 0 <= quirks.tilt_deg <= 20 or not 0 <= quirks.oblique_deg <= 20:
            raise InputError("--bevel_mm must be >= 0, --tilt_deg and --oblique_deg in [0, 20]")
        if not 0 <= quirks.lumbosacral_deg <= 30:
            raise InputError(f"--lumbosacral_deg must be in [0, 30], got {quirks.lumbosacral_deg}")
        if not 0 <= quirks.axial_rotation_deg <= 45:
            raise InputError(f"--axial_rotation_deg must be in [0, 45], got {quirks.axial_rotation_deg}")
        if not 0 <= quirks.osteophyte_mm <= 10:
            raise InputError(f"--osteophyte_mm must be in [0, 10], got {quirks.osteophyte_mm}")
    clear_dataset(out)  # an old or half-written dataset's marker and patients
    args = [
        (out, i, seed, level_ids, spacing_mm, fracture_fraction, straight, quirks) for i in range(patients)
    ]
    rows: list[dict] = []
    bar = tqdm(total=patients, desc="phantom patients", unit="patient", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(generate_patient, *a) for a in args]
            for fut in futures:
                rows.extend(fut.result())
                bar.update()
    else:
        for a in args:
            rows.extend(generate_patient(*a))
            bar.update()
    bar.close()

    pids = [f"phantom{i:03d}" for i in range(patients)]
    split = split_patients(pids, seed)
    grades = {(r["pid"], r["vid"]): r["grade"] for r in rows if r["complete"]}
    data = {
        name: {f"{pid}_{vid}": g for (pid, vid), g in sorted(grades.items()) if pid in members}
        for name, members in split.items()
    }
    write_text(out / "truth" / "vertebrae.csv", _csv_text(rows))
    write_json(out / "vertebra_data.json", data)  # last: marks the dataset finished
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--patients", type=int, default=4, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--spacing_mm", type=float, default=1.0, help="isotropic voxel size in mm")
    parser.add_argument(
        "--levels",
        default="T10-L5",
        help="complete levels to draw, e.g. T10-L5, T10,T11,L1-L5 (no T12), T10-L5,L6 or T11,T12,T13,L1-L5",
    )
    parser.add_argument("--fracture_fraction", type=float, default=0.3, help="mean share of fractured levels")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--straight", action="store_true", help="no curvature or scoliosis (for geometry tests)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    quirks = parser.add_argument_group("quirks of real scans (each with its truth)")
    quirks.add_argument(
        "--truncate", default="", help="cut the field of view: any of cranial,caudal,lateral (comma list)"
    )
    quirks.add_argument("--slice_mm", type=float, default=0.0, help="slice thickness along z (e.g. 3)")
    quirks.add_argument("--bevel_mm", type=float, default=0.0, help="bevelled anterior rims, mm per endplate")
    quirks.add_argument("--tilt_deg", type=float, default=0.0, help="bodies tilted up to this vs the curve")
    quirks.add_argument(
        "--oblique_deg", type=float, default=0.0, help="the scan's grid turned up to this (oblique affine)"
    )
    quirks.add_argument(
        "--lumbosacral_deg", type=float, default=0.0, help="extra lordosis at L5/S1 (steep junction), degrees"
    )
    quirks.add_argument(
        "--axial_rotation_deg",
        type=float,
        default=0.0,
        help="the patient turned about the spine's long axis by up to this (each vertebra a quarter more)",
    )
    quirks.add_argument(
        "--osteophyte_mm", type=float, default=0.0, help="anterior osteophytes reaching up to this, mm"
    )
    quirks.add_argument(
        "--quirks", action="store_true", help="all of them: truncate all three sides, bevel 5 mm, tilt 6 deg"
    )
    return parser


def option_problem(opt: argparse.Namespace) -> str | None:
    """The first thing wrong with the options, before any work starts, or None.

    Memory is estimated generously: 32 bytes per voxel while a patient is rendered (fractured
    and healthy CT, noise and texture in float32, labels and masks) over a field of view of
    FOV_LR_MM x 320 mm x 45 mm per level.
    """
    from util.memory import too_big

    if opt.seed < 0:
        return f"--seed must be >= 0, got {opt.seed}"
    if opt.patients < 1:
        return f"--patients must be at least 1, got {opt.patients}"
    if opt.workers < 1:
        return f"--workers must be at least 1, got {opt.workers}"
    if not np.isfinite(opt.spacing_mm) or not 0 < opt.spacing_mm <= 4:
        return f"--spacing_mm must be a number in (0, 4], got {opt.spacing_mm}"
    if not np.isfinite(opt.fracture_fraction) or not 0 <= opt.fracture_fraction <= 1:
        return f"--fracture_fraction must be in [0, 1], got {opt.fracture_fraction}"
    given = [
        flag
        for flag, value in (
            ("--truncate", getattr(opt, "truncate", "").strip(" ,")),
            ("--bevel_mm", getattr(opt, "bevel_mm", 0.0)),
            ("--tilt_deg", getattr(opt, "tilt_deg", 0.0)),
        )
        if value
    ]
    if getattr(opt, "quirks", False) and given:
        return (
            f"--quirks sets --truncate cranial,caudal,lateral --bevel_mm 5 --tilt_deg 6; "
            f"it would ignore {' '.join(given)}: pass those flags without --quirks"
        )
    for flag in (
        "slice_mm",
        "bevel_mm",
        "tilt_deg",
        "oblique_deg",
        "lumbosacral_deg",
        "axial_rotation_deg",
        "osteophyte_mm",
    ):
        value = getattr(opt, flag, 0.0)
        if not np.isfinite(value):
            return f"--{flag} must be a finite number, got {value}"
    out = Path(opt.out)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder"
    try:
        n_levels = len(label_schemes.parse_levels(opt.levels)) + 2
    except (KeyError, ValueError):
        n_levels = 26  # generate() reports the bad --levels itself
    voxels = FOV_LR_MM * 320.0 * 45.0 * n_levels / opt.spacing_mm**3
    problem = too_big(voxels * 32 * min(opt.workers, opt.patients))
    if problem:
        return f"--spacing_mm {opt.spacing_mm:g}: a patient of {voxels:.3g} voxels would need {problem}"
    return None


def quirks_of(opt: argparse.Namespace) -> Quirks | None:
    """The quirks the options ask for (None: none); ``--quirks`` with the flags outside it added."""
    extra = {
        "oblique_deg": opt.oblique_deg,
        "lumbosacral_deg": opt.lumbosacral_deg,
        "axial_rotation_deg": opt.axial_rotation_deg,
        "osteophyte_mm": opt.osteophyte_mm,
    }
    if opt.quirks:
        return dataclasses.replace(Quirks.all_on(opt.slice_mm), **extra)
    truncate = tuple(t.strip() for t in opt.truncate.split(",") if t.strip())
    quirks = Quirks(truncate, opt.slice_mm, opt.bevel_mm, opt.tilt_deg, **extra)
    return None if quirks == Quirks() else quirks


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(argv)
    problem = option_problem(opt)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        rows = generate(
            opt.out,
            opt.patients,
            opt.seed,
            opt.spacing_mm,
            opt.levels,
            opt.fracture_fraction,
            opt.workers,
            opt.straight,
            opt.overwrite,
            quirks=quirks_of(opt),
        )
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = np.bincount([r["grade"] for r in rows], minlength=4)
    print(
        f"wrote {opt.patients} patients, {len(rows)} vertebrae "
        f"(grades 0/1/2/3: {'/'.join(map(str, counts))}) "
        f"at {opt.spacing_mm} mm to {opt.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

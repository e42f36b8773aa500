"""Analytic vertebra anatomy for the synthetic spine phantom.

Each vertebra is described in its own local frame, in mm, centred on the vertebral body:
``h`` along the height axis (towards inferior), ``a`` anterior to posterior, ``r`` right to left.
Shapes are implicit functions of (h, a, r), so the same description rasterises the CT, the
labels and the exact column heights that :mod:`evaluation.heights` turns into the truth table.

A fracture is a compression of the body along ``h``: each (a, r) column loses a length ``L(a, r)``
taken from its superior and inferior endplates. The fractured body is the healthy body mapped by
that compression, so its trabecular texture is the healthy texture squeezed, and the space the
body gave up is filled by disc tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Anchor sizes in mm by level position (C1 = 1 ... L5 = 24), interpolated in between. Columns:
# mid body height, AP depth, LR width, disc below, canal AP and LR diameters, pedicle width,
# spinous process length and downward angle (deg), transverse process length and backward angle.
_ANCHORS = np.array(
    [
        # p   H     depth width disc  canAP canLR ped  spL   spAng tpL  tpAng
        [3, 14.0, 16.0, 17.0, 5.0, 14.0, 24.0, 5.0, 18.0, 20.0, 12.0, 10.0],
        [7, 15.0, 17.0, 24.0, 5.0, 14.0, 23.0, 6.0, 35.0, 30.0, 14.0, 10.0],
        [8, 17.0, 19.0, 28.0, 4.0, 14.0, 20.0, 7.0, 35.0, 40.0, 18.0, 35.0],
        [13, 19.0, 24.0, 30.0, 4.5, 14.0, 16.0, 6.0, 38.0, 60.0, 18.0, 35.0],
        [17, 21.5, 28.0, 36.0, 5.5, 15.0, 17.0, 7.0, 35.0, 45.0, 16.0, 30.0],
        [19, 23.5, 30.0, 40.0, 7.0, 16.0, 19.0, 8.0, 32.0, 25.0, 10.0, 20.0],
        [20, 25.0, 31.0, 42.0, 8.5, 17.0, 21.0, 9.0, 30.0, 10.0, 16.0, 10.0],
        [22, 27.0, 34.0, 48.0, 10.0, 16.0, 22.0, 10.0, 30.0, 5.0, 24.0, 5.0],
        [24, 27.0, 35.0, 52.0, 11.0, 16.0, 24.0, 12.0, 25.0, 5.0, 20.0, 5.0],
    ]
)
_FIELDS = (
    "H",
    "depth",
    "width",
    "disc",
    "canal_ap",
    "canal_lr",
    "pedicle",
    "sp_len",
    "sp_angle",
    "tp_len",
    "tp_angle",
)

FRACTURE_TYPES = ("wedge", "biconcave", "crush")
# Share of the lost height taken from the superior endplate, by fracture type.
_SUPERIOR_SHARE = {"wedge": 0.85, "biconcave": 0.5, "crush": 0.65}


def level_position(vid: int) -> float:
    """Continuous level position: C1 = 1 ... L5 = 24, T13 between T12 and L1, L6 and sacrum below L5."""
    return {28: 19.5, 25: 24.5, 26: 25.0}.get(int(vid), float(vid))


def anchor_sizes(p: float) -> dict[str, float]:
    """Average adult sizes (mm, degrees) at level position ``p``."""
    p = float(np.clip(p, _ANCHORS[0, 0], _ANCHORS[-1, 0]))
    return {name: float(np.interp(p, _ANCHORS[:, 0], _ANCHORS[:, i + 1])) for i, name in enumerate(_FIELDS)}


def rotation(alpha_deg: float, beta_deg: float) -> np.ndarray:
    """World (RAS) rotation for sagittal angle ``alpha`` (about x) then coronal angle ``beta`` (about y)."""
    a, b = np.deg2rad(alpha_deg), np.deg2rad(beta_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


def local_axes(alpha_deg: float, beta_deg: float) -> np.ndarray:
    """Rows: the height (towards inferior), AP (towards posterior) and LR (towards left) unit vectors."""
    rot = rotation(alpha_deg, beta_deg)
    return np.stack([rot @ [0, 0, -1.0], rot @ [0, -1.0, 0], rot @ [-1.0, 0, 0]])


@dataclass
class Fracture:
    """A compression fracture: type and loss amplitude (fraction of the local healthy height)."""

    kind: str
    amplitude: float

    def loss(
        self, a: np.ndarray, r: np.ndarray, A: float, W: float, healthy_h: np.ndarray, rho: np.ndarray
    ) -> np.ndarray:
        if self.kind == "wedge":
            profile = np.clip((A - a) / (2 * A), 0.0, 1.0)
        elif self.kind == "biconcave":
            profile = np.clip(1.0 - rho**2, 0.0, 1.0)
        elif self.kind == "crush":
            profile = 0.92 + 0.08 * np.cos(np.pi * np.clip(a / A, -1, 1))
        else:
            raise ValueError(f"unknown fracture type {self.kind!r}; choose from {FRACTURE_TYPES}")
        return self.amplitude * healthy_h * profile

    @property
    def superior_share(self) -> float:
        return _SUPERIOR_SHARE[self.kind]


@dataclass
class VertebraShape:
    """One vertebra (or the sacrum) in its local frame; sizes in mm."""

    vid: int
    centre: np.ndarray  # world mm
    axes: np.ndarray  # rows: height, AP, LR unit vectors in world
    H: float
    A: float
    W: float
    wedge: float = 0.0  # physiological wedging: anterior shorter than posterior by this fraction
    endplate_depth: float = 1.2
    waist: float = 0.07  # the walls are concave: the cross-section narrows by this fraction mid-height
    rim: float = 1.5  # rounded rim: columns at the very edge are this much shorter at each end
    kidney: float = 0.08
    bevel: float = 0.0  # bevelled anterior rim: each endplate drops this much (mm) at the anterior wall
    bevel_depth: float = 6.0  # over this AP distance (mm) from the anterior wall
    tilt_to_curve: float = 0.0  # sagittal tilt (degrees) of the body relative to the spine curve
    axial_rotation: float = 0.0  # turn (degrees) about its own height axis, AP towards the left
    # anterior osteophytes: the reach (mm) of the bony lip at the superior / inferior endplate rim
    # (0: none), and how far round the rim it grows from the anterior midline (degrees)
    osteophyte_superior: float = 0.0
    osteophyte_inferior: float = 0.0
    osteophyte_arc_deg: float = 50.0
    exponent: float = 2.4
    canal_a: float = 8.0
    canal_r: float = 10.0
    pedicle: float = 8.0
    lamina: float = 5.5
    sp_len: float = 30.0
    sp_angle: float = 20.0
    sp_height: float = 12.0
    sp_width: float = 7.0
    tp_len: float = 18.0
    tp_angle: float = 10.0
    disc_above: float = 6.0
    disc_below: float = 6.0
    sacrum: bool = False
    fracture: Fracture | None = None
    texture: np.ndarray | None = field(default=None, repr=False)
    texture_origin: np.ndarray | None = field(default=None, repr=False)
    texture_step: float = field(default=0.7, repr=False)

    # --- geometry of the body -------------------------------------------------------------
    def cross_section(self, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Superellipse norm of the kidney-shaped cross-section (<= 1 inside)."""
        indent = self.kidney * self.A * np.clip(1.0 - (r / (0.55 * self.W)) ** 2, 0.0, None)
        a_eff = np.where(a > 0, a + indent, a)
        rho_p = (np.abs(a_eff) / self.A) ** self.exponent + (np.abs(r) / self.W) ** self.exponent
        return rho_p ** (1.0 / self.exponent)

    def healthy_extent(self, a: np.ndarray, r: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Superior and inferior endplate positions (h) of each column of the healthy body.

        Endplates are concave in the centre and rounded at the rim, leaving the raised ring
        (apophysis) in between.
        """
        hh = self.H * (1.0 + self.wedge * np.clip(a / self.A, -1.0, 1.0) / 2.0)
        inset = (
            self.endplate_depth * np.clip(1.0 - rho**2, 0.0, 1.0)
            + self.rim * np.clip((rho - 0.8) / 0.2, 0, 1) ** 2
        )
        if self.bevel > 0:  # a straight bevel at the anterior wall (a < 0 is anterior)
            from_wall = (-a - (self.A - self.bevel_depth)) / self.bevel_depth
            inset = inset + self.bevel * np.clip(from_wall, 0.0, 1.0)
        return -hh / 2 + inset, hh / 2 - inset

    def waist_scale(self, h_healthy: np.ndarray, top0: np.ndarray, bot0: np.ndarray) -> np.ndarray:
        """Cross-section scale at healthy height ``h`` of a column: 1 at its endplates, 1 - waist between.

        Being widest exactly at each column's endplates, the waist never changes a column's first
        or last voxel, so column heights stay those of :meth:`extent`.
        """
        u = np.clip((2.0 * h_healthy - top0 - bot0) / np.maximum(bot0 - top0, 1e-3), -1.0, 1.0)
        return 1.0 - self.waist * (1.0 - u**2)

    def extent(self, a: np.ndarray, r: np.ndarray, fractured: bool) -> tuple[np.ndarray, ...]:
        """(rho, healthy top, healthy bottom, top, bottom) of each column."""
        rho = self.cross_section(a, r)
        top0, bot0 = self.healthy_extent(a, r, rho)
        if not fractured or self.fracture is None:
            return rho, top0, bot0, top0, bot0
        loss = self.fracture.loss(a, r, self.A, self.W, bot0 - top0, rho)
        share = self.fracture.superior_share
        return rho, top0, bot0, top0 + share * loss, bot0 - (1 - share) * loss

    def column_grid(self, step_mm: float = 0.25, fractured: bool = True) -> tuple[np.ndarray, ...]:
        """(a, r, top, bottom) of columns on an (AP, LR) grid (a: AP positions, r: LR positions,
        1D); top and bottom (2D) are NaN outside the body."""
        a = np.arange(-self.A, self.A + step_mm / 2, step_mm)
        r = np.arange(-self.W, self.W + step_mm / 2, step_mm)
        aa, rr = np.meshgrid(a, r, indexing="ij")
        rho, _, _, top, bot = self.extent(aa, rr, fractured)
        inside = rho <= 1.0
        return a, r, np.where(inside, top, np.nan), np.where(inside, bot, np.nan)

    def column_heights(self, step_mm: float = 0.25, fractured: bool = True) -> np.ndarray:
        """Exact body extent along h of columns on an (AP, LR) grid; NaN outside the body."""
        _, _, top, bot = self.column_grid(step_mm, fractured)
        return bot - top

    # --- osteophytes -------------------------------------------------------------------------
    @property
    def has_osteophytes(self) -> bool:
        return self.osteophyte_superior > 0 or self.osteophyte_inferior > 0

    def osteophytes(self, h: np.ndarray, a: np.ndarray, r: np.ndarray, fractured: bool) -> np.ndarray:
        """Bony lips growing out of the anterior (and, with a wide arc, lateral) endplate rims.

        Each lip starts on the wall at its endplate's rim, 3 mm thick there, and reaches
        ``osteophyte_superior`` / ``_inferior`` mm outwards (beyond the body's cross-section),
        thinning and curling towards its disc by up to 40 % of its reach (at most 30 % of the
        disc, so it never meets the lip of the next vertebra). The reach falls off round the rim,
        to nothing ``osteophyte_arc_deg`` from the anterior midline. The lips are no body height:
        :meth:`column_heights` leaves them out.
        """
        out = np.zeros(np.shape(h), dtype=bool)
        if not self.has_osteophytes or self.sacrum:
            return out
        rho = self.cross_section(a, r)
        theta = np.degrees(np.arctan2(np.abs(r) / self.W, np.maximum(-a, 0.0) / self.A + 1e-9))
        theta = np.where(a < 0, theta, 90.0 + np.degrees(np.arctan2(a, self.A)))  # behind the midline
        spread = np.clip(1.0 - (theta / self.osteophyte_arc_deg) ** 2, 0.0, 1.0)
        t = np.radians(np.minimum(theta, 90.0))
        s = (rho - 1.0) * np.hypot(self.A * np.cos(t), self.W * np.sin(t))  # outward from the wall (mm)
        rb = np.maximum(rho, 1e-6)
        _, _, _, top, bot = self.extent(a / rb, r / rb, fractured)  # the endplates at the rim
        for reach_mm, disc, sign, edge in (
            (self.osteophyte_superior, self.disc_above, -1.0, top),
            (self.osteophyte_inferior, self.disc_below, 1.0, bot),
        ):
            if reach_mm <= 0:
                continue
            reach = reach_mm * spread
            u = np.clip(s / np.maximum(reach, 1e-6), 0.0, 1.0)
            curl = min(0.4 * reach_mm, 0.3 * disc) * u**2
            outer = edge + sign * (curl + 0.5)  # towards the disc
            inner = edge - sign * (3.0 * (1.0 - u) + 0.75)  # into the body along the wall
            lo, hi = np.minimum(outer, inner), np.maximum(outer, inner)
            out |= (reach > 0.5) & (s >= -1.0) & (s <= reach) & (h >= lo) & (h <= hi)
        return out

    # --- posterior elements ---------------------------------------------------------------
    @property
    def wall(self) -> float:
        """AP position of the posterior body wall at the midline."""
        return self.A * (1.0 - self.kidney)

    @property
    def canal_centre(self) -> float:
        return self.wall + self.canal_a

    def canal(self, h: np.ndarray, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        inside = ((a - self.canal_centre) / self.canal_a) ** 2 + (r / self.canal_r) ** 2 <= 1.0
        return (
            inside
            & (h >= -(self.H + self.disc_above) / 2 - 0.5)
            & (h <= (self.H + self.disc_below) / 2 + 0.5)
        )

    def posterior(self, h: np.ndarray, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Pedicles, lamina, spinous, transverse and articular processes (empty for the sacrum)."""
        if self.sacrum:
            return self._alae(h, a, r)
        H, ac, ca, cr = self.H, self.canal_centre, self.canal_a, self.canal_r
        h_ped = -H / 2 + 0.3 * H
        # pedicles: elliptic cylinders along AP on both sides of the canal, upper half of the body
        r_ped = cr + self.pedicle / 2 - 1.0
        ped = ((np.abs(r) - r_ped) / (self.pedicle / 2)) ** 2 + ((h - h_ped) / (0.22 * H)) ** 2 <= 1.0
        ped &= (a >= self.wall - 4.0) & (a <= ac + 0.4 * ca)
        # lamina: a ring behind the canal
        ring_in = ((a - ac) / ca) ** 2 + (r / cr) ** 2 > 1.0
        ring_out = ((a - ac) / (ca + self.lamina)) ** 2 + (r / (cr + self.lamina)) ** 2 <= 1.0
        lam = ring_in & ring_out & (a >= ac - 0.2 * ca) & (h >= -H / 2 + 0.1 * H) & (h <= H / 2 + 0.15 * H)
        # spinous process: a capsule from the lamina backwards and downwards
        theta = np.deg2rad(self.sp_angle)
        p0 = np.array([h_ped + 0.1 * H, ac + ca + 0.5 * self.lamina])
        d = np.array([np.sin(theta), np.cos(theta)])
        spin = _capsule2d(h, a, p0, d, self.sp_len, self.sp_height / 2) & (np.abs(r) <= self.sp_width / 2)
        # transverse processes: capsules sideways (and backwards) at pedicle height
        phi = np.deg2rad(self.tp_angle)
        r0 = cr + self.pedicle - 1.0
        tp = _capsule2d(
            a, np.abs(r), np.array([ac, r0]), np.array([np.sin(phi), np.cos(phi)]), self.tp_len, 4.0
        )
        tp &= np.abs(h - h_ped) <= 5.0
        # articular processes: short vertical columns reaching towards the neighbours (facet joints)
        art_a = ((a - (ac + 0.6 * ca)) / 4.5) ** 2
        sup = (
            (art_a + ((np.abs(r) - (cr + 0.9 * self.pedicle)) / 4.5) ** 2 <= 1.0)
            & (h <= h_ped)
            & (h >= -H / 2 - 0.6 * self.disc_above)
        )
        inf = (
            (art_a + ((np.abs(r) - (cr + 0.3 * self.pedicle)) / 4.0) ** 2 <= 1.0)
            & (h >= H / 2 - 0.2 * H)
            & (h <= H / 2 + 0.7 * self.disc_below)
        )
        return ped | lam | spin | tp | sup | inf

    def _alae(self, h: np.ndarray, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Sacral alae: wide wings lateral to the S1 body."""
        wing = ((np.abs(r) - self.W) / 32.0) ** 2 + (a / (0.9 * self.A)) ** 2 <= 1.0
        return wing & (np.abs(r) >= 0.8 * self.W) & (h >= -self.H / 2 + 2.0) & (h <= self.H / 2 + 25.0)

    # --- texture ----------------------------------------------------------------------------
    def make_texture(self, rng: np.random.Generator, step_mm: float = 0.7) -> None:
        """Band-pass noise in the local frame: the trabecular pattern of the cancellous bone."""
        ext = np.array([self.H / 2 + 4, self.A + 4, self.W + 4])
        shape = tuple(int(np.ceil(2 * e / step_mm)) + 1 for e in ext)
        noise = rng.standard_normal(shape).astype(np.float32)
        band = ndimage.gaussian_filter(noise, 0.8) - ndimage.gaussian_filter(noise, 2.5)
        band /= band.std() + 1e-6
        self.texture = np.tanh(1.5 * band).astype(np.float32)
        self.texture_origin = -ext
        self.texture_step = step_mm

    def sample_texture(self, h: np.ndarray, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        if self.texture is None:
            return np.zeros_like(h)
        coords = [(c - o) / self.texture_step for c, o in zip((h, a, r), self.texture_origin, strict=True)]
        return ndimage.map_coordinates(self.texture, coords, order=1, mode="nearest")

    # --- bounding box -----------------------------------------------------------------------
    def local_box(self) -> np.ndarray:
        """(3, 2) bounds of everything this vertebra draws, in local (h, a, r) mm."""
        if self.sacrum:
            return np.array(
                [[-self.H / 2 - 4, self.H / 2 + 30], [-self.A - 4, self.A + 25], [-self.W - 36, self.W + 36]]
            )
        reach_a = self.canal_centre + self.canal_a + self.lamina + self.sp_len + self.sp_height
        reach_r = self.canal_r + self.pedicle + self.tp_len + 6.0
        droop = self.sp_len * np.sin(np.deg2rad(self.sp_angle)) + self.sp_height
        lip = max(self.osteophyte_superior, self.osteophyte_inferior)
        return np.array(
            [
                [-(self.H / 2 + self.disc_above + 3), self.H / 2 + max(self.disc_below + 3, droop)],
                [-self.A - 4 - lip, reach_a],
                [-reach_r, reach_r],
            ]
        )


def _capsule2d(
    x: np.ndarray, y: np.ndarray, p0: np.ndarray, direction: np.ndarray, length: float, radius: float
) -> np.ndarray:
    """Points within ``radius`` of the segment p0 -> p0 + length * direction in the (x, y) plane."""
    dx, dy = x - p0[0], y - p0[1]
    t = np.clip(dx * direction[0] + dy * direction[1], 0.0, length)
    return (dx - t * direction[0]) ** 2 + (dy - t * direction[1]) ** 2 <= radius**2

"""Vertebra label conventions.

VerSe ids are the project's internal convention: 1-7 = C1-C7, 8-19 = T1-T12, 20-24 = L1-L5,
25 = L6, 28 = T13 (transitional vertebrae), 26 = sacrum, 27 = coccyx. Other segmentation
conventions are mapped onto VerSe ids when a mask is loaded (``--label_scheme``).

To add a scheme, add a ``{source id: VerSe id}`` table to :data:`SCHEMES`; ids not in the table
are set to background.

Neighbours are found from the labels present in a scan, walking the anatomical order, so a
T13 between T12 and L1, an L6 below L5 and a missing level are all handled.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

SACRUM = 26
COCCYX = 27

VERTEBRA_NAMES: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{i + 7: f"T{i}" for i in range(1, 13)},
    **{i + 19: f"L{i}" for i in range(1, 6)},
    25: "L6",
    28: "T13",
}
OTHER_NAMES: dict[int, str] = {SACRUM: "S", COCCYX: "Co"}

# Cranial to caudal, transitional vertebrae in their anatomical place.
SPINE_ORDER: tuple[int, ...] = (*range(1, 20), 28, *range(20, 26), SACRUM, COCCYX)
_RANK = {vid: rank for rank, vid in enumerate(SPINE_ORDER)}
# The usual sequence without transitional levels, for level ranges such as "T10-L5".
STANDARD_SEQUENCE: tuple[int, ...] = tuple(range(1, 25))

# TotalSegmentator v2 ("total" task): 25 = sacrum, 26 = vertebrae_S1, 27 = L5 ... 31 = L1,
# 32 = T12 ... 43 = T1, 44 = C7 ... 50 = C1. Both sacrum classes are the VerSe sacrum.
TOTALSEG_TO_VERSE: dict[int, int] = {25: SACRUM, 26: SACRUM, **{ts: 51 - ts for ts in range(27, 51)}}
VERSE_IDS: dict[int, int] = {vid: vid for vid in SPINE_ORDER}

SCHEMES: dict[str, dict[int, int]] = {"verse": VERSE_IDS, "totalseg": TOTALSEG_TO_VERSE}


def is_vertebra(vid: int) -> bool:
    """True for vertebra ids (C1..L6, T13); False for background, sacrum, coccyx or unknown ids."""
    return int(vid) in VERTEBRA_NAMES


def vertebra_name(vid: int) -> str:
    """Name of a VerSe id, e.g. 20 -> 'L1', 28 -> 'T13', 26 -> 'S'."""
    vid = int(vid)
    if vid in VERTEBRA_NAMES:
        return VERTEBRA_NAMES[vid]
    if vid in OTHER_NAMES:
        return OTHER_NAMES[vid]
    raise KeyError(f"{vid} is not a VerSe vertebra id (known: {sorted(_RANK)})")


def vertebra_id(name: str) -> int:
    """VerSe id of a vertebra name ('L1' -> 20, 'T13' -> 28, 'S1' or 'S' -> 26)."""
    key = name.strip().upper()
    if key in ("S", "S1", "SACRUM"):
        return SACRUM
    if key in ("CO", "COCCYX"):
        return COCCYX
    for vid, vname in VERTEBRA_NAMES.items():
        if vname == key:
            return vid
    raise KeyError(f"unknown vertebra name {name!r}; use C1-C7, T1-T13, L1-L6")


def spine_rank(vid: int) -> int:
    """Position in cranial-to-caudal order (for sorting)."""
    try:
        return _RANK[int(vid)]
    except KeyError:
        raise KeyError(f"{vid} is not a VerSe id (known: {sorted(_RANK)})") from None


def sort_spine_order(ids: Iterable[int]) -> list[int]:
    """Sort VerSe ids cranial to caudal."""
    return sorted((int(v) for v in ids), key=spine_rank)


def parse_levels(spec: str) -> list[int]:
    """Parse a level range such as 'T10-L5' or a list such as 'T12,L1,L2' into VerSe ids.

    Ranges walk the standard sequence C1..L5; name T13 or L6 explicitly to include them.
    """
    ids: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"([A-Za-z]+\d*)\s*-\s*([A-Za-z]+\d*)", part)
        if match:
            start, stop = (vertebra_id(m) for m in match.groups())
            if start not in STANDARD_SEQUENCE or stop not in STANDARD_SEQUENCE:
                raise ValueError(f"level range {part!r} must run within C1-L5")
            i, j = STANDARD_SEQUENCE.index(start), STANDARD_SEQUENCE.index(stop)
            if i > j:
                raise ValueError(f"level range {part!r} runs caudal to cranial; write it cranial first")
            ids.extend(STANDARD_SEQUENCE[i : j + 1])
        else:
            ids.append(vertebra_id(part))
    if not ids:
        raise ValueError(f"no levels in {spec!r}")
    return sort_spine_order(dict.fromkeys(ids))


def neighbours(vid: int, present: Iterable[int]) -> tuple[int | None, int | None]:
    """The nearest vertebrae above and below ``vid`` among the labels present.

    Walks the anatomical order, so T12 -> T13 -> L1 and L5 -> L6 work, and a level absent from
    the scan (a missing or unlabelled vertebra) is stepped over. Sacrum and coccyx are never
    returned: they are not vertebrae to synthesise.
    """
    rank = spine_rank(vid)
    verts = [v for v in set(int(p) for p in present) if is_vertebra(v) and v != int(vid)]
    above = [v for v in verts if spine_rank(v) < rank]
    below = [v for v in verts if spine_rank(v) > rank]
    upper = max(above, key=spine_rank) if above else None
    lower = min(below, key=spine_rank) if below else None
    return upper, lower


def lookup_table(scheme: str, max_id: int) -> np.ndarray:
    """A lookup table mapping ``scheme`` ids 0..max_id to VerSe ids (unknown ids -> 0).

    The table stops at the largest id the scheme knows, whatever ``max_id`` is, so a stray
    huge id (4294967295) costs nothing; :func:`to_verse` maps ids beyond the table to 0.
    """
    if scheme not in SCHEMES:
        raise KeyError(f"unknown label scheme {scheme!r}; available: {sorted(SCHEMES)}")
    top = min(max(int(max_id), 0), max(SCHEMES[scheme]))
    lut = np.zeros(top + 1, dtype=np.uint8)
    for source, verse in SCHEMES[scheme].items():
        if source <= top:
            lut[source] = verse
    return lut


def to_verse(labels: np.ndarray, scheme: str) -> np.ndarray:
    """Map an integer label array from ``scheme`` to VerSe ids (uint8); unknown ids become 0."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return labels.astype(np.uint8)
    if labels.min() < 0:
        raise ValueError("labels must be non-negative")
    lut = lookup_table(scheme, int(labels.max()))
    if int(labels.max()) < lut.size:
        return lut[labels]
    return np.where(labels < lut.size, lut[np.minimum(labels, lut.size - 1)], 0).astype(np.uint8)


def unique_ids(labels: np.ndarray) -> list[int]:
    """The distinct non-negative integer ids of ``labels``, ascending, without huge allocations."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return []
    if int(labels.max()) < 1 << 16:
        return np.flatnonzero(np.bincount(labels.ravel().astype(np.int64, copy=False))).tolist()
    return [int(v) for v in np.unique(labels)]


def _id_list(ids: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``'1-3, 7'``."""
    ids = sorted(set(int(v) for v in ids))
    runs: list[str] = []
    start = prev = None
    for v in [*ids, None]:
        if prev is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(runs)


def unknown_ids_report(present: Iterable[int], scheme: str) -> tuple[str | None, bool]:
    """(a message naming the ids ``scheme`` does not know, whether it is fatal), or (None, False).

    Fatal when another scheme explains the ids as vertebrae and ``scheme`` does not: a
    TotalSegmentator mask read as VerSe gives one "T13" and nonsense, so it is refused with
    the option to pass.
    """
    present = {int(v) for v in present} - {0}
    unknown = present - set(SCHEMES[scheme])
    if not unknown:
        return None, False
    ours = sum(is_vertebra(SCHEMES[scheme].get(v, 0)) for v in present)
    for other, table in SCHEMES.items():
        if other == scheme:
            continue
        theirs = sum(is_vertebra(table.get(v, 0)) for v in present)
        if present - set(table) < unknown and theirs > ours:
            return (
                f"ids {_id_list(unknown)} are not {scheme} labels; the ids fit the {other} scheme "
                f"({theirs} vertebrae): pass --label_scheme {other}",
                True,
            )
    return (
        f"ids {_id_list(unknown)} are not vertebra or sacrum labels of the {scheme} scheme; they are "
        "ignored (set to background)",
        False,
    )


def parse_label_id(value: object) -> int:
    """A label id from a json value: a whole, non-negative number; ValueError for 20.5, true, "L1"."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"label {value!r} is not a number")
    if not np.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"label {value!r} is not a whole non-negative number")
    return int(value)


# A whole vertebra (body and posterior elements) is well under this; organs are far above it.
MAX_VERTEBRA_VOLUME_MM3 = 250_000.0
# Neighbouring vertebrae are stacked along the spine: centroids this far apart at least.
MIN_NEIGHBOUR_DISTANCE_MM = 5.0


def spine_problem(
    centres_mm: dict[int, np.ndarray], volumes_mm3: dict[int, float] | None = None
) -> str | None:
    """Why labelled structures cannot be a spine, or None if they can.

    Args:
        centres_mm: world centroid (RAS+, mm) of each vertebra id.
        volumes_mm3: volume of each vertebra id, if known.

    Returns:
        A message when a label is far larger than any vertebra, or when vertebrae next to each
        other in spine order are not stacked from superior to inferior (a heart or organ mask
        read as C1-C3, say).
    """
    volumes = volumes_mm3 or {}
    big = sorted(v for v, vol in volumes.items() if is_vertebra(v) and vol > MAX_VERTEBRA_VOLUME_MM3)
    if big:
        v = big[0]
        return (
            f"label {v} ({vertebra_name(v)}) covers {volumes[v] / 1000:.0f} cm3, far more than any "
            "vertebra: is this a vertebra mask, and is --label_scheme right?"
        )
    order = sort_spine_order(v for v in centres_mm if is_vertebra(v))
    for upper, lower in zip(order[:-1], order[1:], strict=False):
        step = np.asarray(centres_mm[upper], float) - np.asarray(centres_mm[lower], float)
        if step[2] < MIN_NEIGHBOUR_DISTANCE_MM * 0.5 or np.linalg.norm(step) < MIN_NEIGHBOUR_DISTANCE_MM:
            return (
                f"labels {upper} ({vertebra_name(upper)}) and {lower} ({vertebra_name(lower)}) are not "
                "stacked one above the other as vertebrae are: is this a vertebra mask, and is "
                "--label_scheme right?"
            )
    return None

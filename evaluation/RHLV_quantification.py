"""Relative height loss (RHLV) of every vertebra against a pseudo-healthy estimate.

    python evaluation/RHLV_quantification.py --label-folder D/straightened/label --result-folder Q
        [--method gan --output-folder O | --method neighbors] [--json-path D/vertebra_data.json]
        [--height-definition design|reference] [--truth D/truth] [--no-maps] [--overwrite]

``gan``: the healthy heights H_syn are measured on the synthesised target in
``O/label_fake/<pid>_<vid>.nii.gz`` (on the crop's grid). ``neighbors`` (the baseline, no GAN):
H_syn is the mean of the adjacent vertebrae's heights (found among the labels present, so L6, T13
and missing levels work), each measured on its own crop, a neighbour that looks deformed left out
while another is usable. H_ori is measured on the vertebra's own crop. RHLV = (H_syn - H_ori)/H_syn
per region (evaluation/rhlv.py). A synthesised target that cannot be the healthy twin (empty, or
under half the original's volume: typically a run applied to scans unlike its training data)
gives no H_syn and no RHLV, with a warning and the reason in the csv's last column, ``note``, and
in ``summary.json`` (``no_rhlv``); the grading leaves such rows out. With ``neighbors`` the note
also says when the healthy estimate is weaker than the mean of two healthy-looking neighbours:
one neighbour only (the end of the scan, or the other looks deformed), or neighbours that look
deformed, used because there was no other (``summary.json``'s ``notes`` lists every note).

Writes ``Q/rhlv.csv`` (one row per vertebra of the split file, or of every crop without
``--json-path``), ``Q/maps/<pid>_<vid>.png`` (the loss per column over the AP x LR grid) and
``Q/summary.json``; with ``--truth`` (a phantom), ``Q/truth_errors.json``: height and RHLV errors
against the true pre-fracture anatomy. Every vertebra is measured before anything is written (bad
input leaves no files), and every map is drawn again whenever ``rhlv.csv`` is written (last), so
the maps agree with it. Reruns skip a finished folder unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data import label_schemes
from data.base_dataset import split_key
from data.crops import Crop, CropStore, crop_key
from evaluation import rhlv
from evaluation.eval_io import (
    Entry,
    check_output_folder,
    csv_text,
    load_fake,
    read_truth_table,
    run_script,
    split_entries,
    target_of,
)
from util.atomic import atomic_path, write_json, write_text
from util.errors import input_error

log = logging.getLogger(__name__)

METHODS = ("gan", "neighbors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--label-folder", required=True, help="straightened label crops, D/straightened/label"
    )
    parser.add_argument("--output-folder", help="synthesis output with label_fake/ (for gan)")
    parser.add_argument("--result-folder", required=True, help="where rhlv.csv and the maps go")
    parser.add_argument("--json-path", help="split file with grades (default: every crop)")
    parser.add_argument("--method", choices=METHODS, default="gan", help="source of the healthy heights")
    parser.add_argument(
        "--height-definition",
        choices=rhlv.HEIGHT_DEFINITIONS,
        default="design",
        help="design: the one DESIGN.md definition; reference: the reference's filtered column means",
    )
    parser.add_argument("--truth", help="a phantom's truth/ folder: also write truth_errors.json")
    parser.add_argument("--no-maps", action="store_true", help="do not draw the height-loss maps")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished result folder")
    return parser


def open_store(label_folder: str) -> CropStore:
    """The crop store of ``--label-folder`` (the label/ folder itself, or a straightened root)."""
    folder = Path(label_folder)
    if not folder.is_dir():
        raise input_error(folder, "label folder not found")
    root = folder.parent if folder.name == "label" else folder
    store = CropStore(root, need_ct=False)
    if not len(store):
        raise input_error(folder, "no label crops (<pid>_<vid>.nii.gz) here")
    for key in store.keys():
        try:
            split_key(key)
        except ValueError:
            raise input_error(
                store.paths(key)[1], "not a label crop: its name is not '<pid>_<vertebra id>.nii.gz'"
            ) from None
    return store


def entries_of(store: CropStore, json_path: str | None) -> list[Entry]:
    """The split file's vertebrae, or every crop (grade and split unknown) without one."""
    if json_path:
        return split_entries(json_path)
    return [Entry(key, *split_key(key), None, None) for key in store.keys()]


class Measurer:
    """Heights of crops' targets, each crop measured once."""

    def __init__(self, store: CropStore, definition: str):
        self.store = store
        self.definition = definition
        self._heights: dict[str, np.ndarray] = {}
        self._vids_of: dict[str, set[int]] = {}
        for key in store.keys():
            pid, vid = split_key(key)
            self._vids_of.setdefault(pid, set()).add(vid)

    def target(self, crop: Crop) -> np.ndarray:
        return crop.label == crop.vid

    def heights(self, key: str) -> np.ndarray:
        if key not in self._heights:
            crop = self.store.load(key)
            self._heights[key] = rhlv.vertebra_heights(self.target(crop), crop.spacing_mm, self.definition)
        return self._heights[key]

    def neighbour_keys(self, crop: Crop) -> list[str]:
        """Keys of the upper and lower neighbours that have crops of their own."""
        present = set(np.flatnonzero(np.bincount(crop.label.ravel())).tolist()) | self._vids_of[crop.pid]
        keys = []
        for nb in label_schemes.neighbours(crop.vid, present):
            if nb is None:
                continue
            key = crop_key(crop.pid, nb)
            if nb in self._vids_of[crop.pid]:
                keys.append(key)
            else:
                log.info("%s: neighbour %s has no crop of its own; not used", crop.key, key)
        return keys


def measure_gan(
    m: Measurer, crop: Crop, output_folder: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str]:
    """(H_syn, H_ori, column loss map, note, remark) with the synthesised target as the healthy
    vertebra (no remark).

    A synthesis that cannot be the healthy twin (:func:`evaluation.rhlv.synthesis_problem`: empty,
    or under half the original's volume) gives no H_syn, hence no RHLV, and the note says why."""
    syn = target_of(load_fake(output_folder, "label_fake", crop), crop.vid)
    ori = m.target(crop)
    problem = rhlv.synthesis_problem(syn, ori)
    if problem:
        log.warning("%s (vertebra %d): %s; no RHLV", crop.key, crop.vid, problem)
        return np.full(4, np.nan), m.heights(crop.key), np.full(ori.shape[1:], np.nan), problem, ""
    h_syn, h_ori = rhlv.paired_heights(syn, ori, crop.spacing_mm, m.definition)
    loss = rhlv.column_loss_map(rhlv.column_map(syn, crop.spacing_mm), rhlv.column_map(ori, crop.spacing_mm))
    return h_syn, h_ori, loss, "", ""


def measure_neighbors(m: Measurer, crop: Crop) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, str]:
    """(H_syn, H_ori, column loss map, note, remark) with the neighbour estimate as the healthy
    vertebra; the remark says when that estimate is weaker (:func:`evaluation.rhlv.neighbour_note`)."""
    keys = m.neighbour_keys(crop)
    heights = [m.heights(k) for k in keys]
    h_syn, used = rhlv.neighbour_estimate(heights)
    deformed = [rhlv.is_measured(h) and rhlv.looks_deformed(h) for h in heights]
    remark = rhlv.neighbour_note(keys, used, deformed)
    h_ori = m.heights(crop.key)
    ori_map = rhlv.column_map(m.target(crop), crop.spacing_mm)
    if used:
        maps = [rhlv.column_map(m.target(m.store.load(keys[i])), crop.spacing_mm) for i in used]
        loss = rhlv.column_loss_map(rhlv.mean_column_map(maps), ori_map)
    else:
        log.warning("%s: no neighbour with a crop; no healthy estimate", crop.key)
        loss = np.full(ori_map.shape, np.nan)
    return h_syn, h_ori, loss, "" if used else "no neighbour measured", remark


class LossMapWriter:
    """Height-loss maps as PNG: the loss per column over the AP (rows) x LR (columns) grid.

    One figure is drawn once and reused (its image data and title replaced), which makes a map
    cost a ``savefig`` rather than a new figure.
    """

    def __init__(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self._plt = plt
        self.fig, self.ax = plt.subplots(figsize=(3.8, 3.6))
        cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
        self.im = self.ax.imshow(np.zeros((2, 2)), cmap=cmap, vmin=-0.6, vmax=0.6, interpolation="nearest")
        self.ax.set_xlabel("right -> left")
        self.ax.set_ylabel("anterior -> posterior")
        self.ax.set_xticks([])
        self.ax.set_yticks([])
        self.fig.colorbar(self.im, ax=self.ax, fraction=0.046, pad=0.04, label="(H_syn - H_ori) / H_syn")
        self.fig.subplots_adjust(left=0.08, right=0.80, top=0.86, bottom=0.08)

    @staticmethod
    def body_window(loss: np.ndarray) -> np.ndarray:
        """The map cropped to the body with two columns of margin (float32: what is drawn)."""
        shown = np.asarray(loss, dtype=np.float32)
        rows, cols = np.nonzero(np.isfinite(shown))
        if rows.size:
            shown = shown[max(rows.min() - 2, 0) : rows.max() + 3, max(cols.min() - 2, 0) : cols.max() + 3]
        return shown

    def save(self, path: Path, loss: np.ndarray, spacing_mm: np.ndarray, title: str) -> None:
        shown = self.body_window(loss)
        h, w = shown.shape
        self.im.set_data(np.ma.masked_invalid(shown))
        self.im.set_extent((-0.5, w - 0.5, h - 0.5, -0.5))
        self.ax.set_xlim(-0.5, w - 0.5)
        self.ax.set_ylim(h - 0.5, -0.5)
        self.ax.set_aspect(float(spacing_mm[1] / spacing_mm[2]))
        self.ax.set_title(title, fontsize=7)
        with atomic_path(path) as tmp:
            self.fig.savefig(tmp, dpi=90)

    def close(self) -> None:
        self._plt.close(self.fig)


def run(opt: argparse.Namespace) -> tuple[int, int, int, Path]:
    """Measure every vertebra and write the results; returns (rows written, vertebrae skipped,
    rows with an RHLV missing, csv).

    Every vertebra is measured before anything is written, so bad input leaves no maps behind;
    the maps are then all drawn again, so they always agree with the ``rhlv.csv`` written last.
    """
    if opt.method == "gan":
        if not opt.output_folder:
            raise input_error(None, "--method gan needs --output-folder (the synthesis output)")
        check_output_folder(opt.output_folder, ("label_fake",))
    store = open_store(opt.label_folder)
    truth = read_truth_table(opt.truth) if opt.truth else None
    entries = entries_of(store, opt.json_path)
    measurer = Measurer(store, opt.height_definition)
    result = Path(opt.result_folder)
    rows, skipped = [], {"no crop": 0, "no synthesis": 0}
    loss_maps = []  # (loss map, spacing) of each row, drawn once everything is measured
    for entry in tqdm(entries, desc=f"RHLV ({opt.method})", unit="vertebra"):
        key, pid, vid, grade, split = entry.key, entry.pid, entry.vid, entry.grade, entry.split
        if key not in store:
            skipped["no crop"] += 1
            continue
        label_path = store.paths(key)[1]
        if not label_schemes.is_vertebra(vid):
            raise input_error(label_path, f"{vid} is not a VerSe vertebra id")
        crop = store.load(key)
        if not measurer.target(crop).any():
            raise input_error(label_path, f"the crop holds no voxel of its vertebra {vid}")
        if opt.method == "gan":
            if not (Path(opt.output_folder) / "label_fake" / f"{key}.nii.gz").exists():
                skipped["no synthesis"] += 1
                continue
            h_syn, h_ori, loss, note, remark = measure_gan(measurer, crop, opt.output_folder)
        else:
            h_syn, h_ori, loss, note, remark = measure_neighbors(measurer, crop)
        if opt.height_definition == "design":
            h_syn, h_ori = rhlv.over_common_regions(h_syn, h_ori)
        rows.append(rhlv.rhlv_row(key, pid, vid, grade, split, h_syn, h_ori, note, remark))
        if not opt.no_maps:
            loss_maps.append((LossMapWriter.body_window(loss), crop.spacing_mm))
    if not rows:
        why = ", ".join(f"{n} {k}" for k, n in skipped.items() if n)
        raise input_error(opt.json_path or opt.label_folder, f"no vertebra could be measured ({why})")
    if loss_maps:
        maps = LossMapWriter()
        try:
            for row, (loss, spacing_mm) in tqdm(
                zip(rows, loss_maps, strict=True), total=len(rows), desc="maps", unit="map"
            ):
                grade = row["grade"]
                title = (
                    f"{row['vertebra']} ({label_schemes.vertebra_name(row['vid'])}) grade {grade}, "
                    f"{opt.method}\nRHLV a/m/p {row['rhlv_anterior']} / {row['rhlv_middle']} / "
                    f"{row['rhlv_posterior']}"
                )
                maps.save(result / "maps" / f"{row['vertebra']}.png", loss, spacing_mm, title)
        finally:
            maps.close()
    write_json(
        result / "summary.json",
        {
            "method": opt.method,
            "height_definition": opt.height_definition,
            "n_vertebrae": len(rows),
            "skipped": skipped,
            "no_rhlv": {row["vertebra"]: row["note"] for row in rows if rhlv.rhlv_missing(row)},
            "notes": {row["vertebra"]: row["note"] for row in rows if row["note"]},
            "mean_rhlv_by_grade": _mean_by_grade(rows),
        },
    )
    if truth is not None:
        write_json(result / "truth_errors.json", rhlv.truth_errors(rows, truth))
    csv_path = result / "rhlv.csv"
    write_text(csv_path, csv_text(rows, rhlv.RHLV_COLUMNS))  # last: marks the folder finished
    return len(rows), sum(skipped.values()), sum(1 for r in rows if rhlv.rhlv_missing(r)), csv_path


def _mean_by_grade(rows: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for grade in sorted({str(r["grade"]) for r in rows}):
        sel = [r for r in rows if str(r["grade"]) == grade]
        out[grade or "unknown"] = {
            region: _mean([r[f"rhlv_{region}"] for r in sel]) for region in rhlv.ALL_REGIONS
        } | {"n": len(sel)}
    return out


def _mean(values: list) -> float | None:
    arr = np.array([float(v) for v in values if v != ""])
    return round(float(arr.mean()), 5) if arr.size else None


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def summary(result: tuple[int, int, int, Path], seconds: float) -> str:
        n, skipped, no_rhlv, csv_path = result
        why = f", {no_rhlv} of them with RHLV missing (the note column says why)" if no_rhlv else ""
        return (
            f"RHLV ({opt.method}, {opt.height_definition} heights) of {n} vertebrae{why} in "
            f"{seconds:.1f} s; {skipped} skipped; {csv_path}"
        )

    done = Path(opt.result_folder) / "rhlv.csv"
    return run_script(done, opt.overwrite, "measure", lambda: run(opt), summary)


if __name__ == "__main__":
    sys.exit(main())

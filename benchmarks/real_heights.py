"""Real-data report: every vertebra of every real vertebra mask in the shared data, checked by eye.

    python -m benchmarks.real_heights [--shared ../shared/data] [--out real_heights] [--spacing_mm 1.0]
        [--cases tptbox_l3 verse004 ...] [--overwrite]

For each mask: centroids and completeness (``straighten/location_json_local.py``), straightening
of the labels (``straighten/straighten_mask_3d.py --labels_only``, CT crops too where the scan
has a CT), then heights, completeness and tilt of every vertebra (``evaluation/heights.py``).
Writes ``OUT/heights.csv``, one sagittal PNG per measured vertebra (the crop's slice through the
body's left-right centre, the CT where there is one, every label outlined thin and the measured
body thick) and ``OUT/index.md`` + ``OUT/index.html`` with the table and the pictures. Cut
vertebrae are listed with their reason and no heights. Work folders are kept in ``OUT/work``.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import io
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from data import label_schemes
from data.crops import CropStore
from evaluation.heights import REGIONS, csv_text, dataset_rows
from straighten import location_json_local, straighten_mask_3d
from util.atomic import write_text

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# (patient id, mask, CT or None, label scheme): the shared masks with vertebra labels
CASES = (
    ("tptbox_l3", "real/tptbox_l3_ct/vert_msk.nii.gz", "real/tptbox_l3_ct/ct.nii.gz", "verse"),
    ("verse004", "masks/sub-verse004_vert_msk.nii.gz", None, "verse"),
    ("hv0007", "masks/0007_msk.nii.gz", None, "verse"),
    (
        "totalseg_abdomen",
        "real/totalseg_abdomen_ct/vert_msk_totalseg_ids.nii.gz",
        "real/totalseg_abdomen_ct/ct.nii.gz",
        "totalseg",
    ),
    (
        "unpaired_ct",
        "real/unpaired_mr_ct/ct_seg_totalseg_ids.nii.gz",
        "real/unpaired_mr_ct/ct.nii.gz",
        "totalseg",
    ),
)
VIEW_MM = 45.0  # half-size of the picture around the body


def prepare(work: Path, shared: Path, pid: str, mask: str, ct: str | None) -> Path:
    """A one-patient dataset root for ``pid`` holding copies of its mask (and CT)."""
    root = work / pid
    folder = root / "raw" / pid
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared / mask, folder / f"{pid}_msk.nii.gz")
    if ct:
        shutil.copy(shared / ct, folder / f"{pid}.nii.gz")
    return root


def run_quietly(fn, args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = fn(args)
    return code, err.getvalue().strip()


def save_picture(store: CropStore, key: str, row: dict, path: Path) -> None:
    """Sagittal slice of the crop through its body, labels outlined, the body thick."""
    from util.plotting import draw_slice, plt, save_figure

    crop = store.load(key)
    body = crop.label == crop.vid
    rows_, aps, lrs = np.nonzero(body)
    k = int(round(lrs.mean()))
    sp = crop.spacing_mm
    c0, c1 = int(round(rows_.mean())), int(round(aps.mean()))
    h0, h1 = int(VIEW_MM / sp[0]), int(VIEW_MM / sp[1])
    win = (slice(max(0, c0 - h0), c0 + h0), slice(max(0, c1 - h1), c1 + h1))
    image = None if crop.ct is None else crop.ct[win[0], win[1], k] / 255.0
    fig, ax = plt.subplots(figsize=(3.2, 3.4))
    title = (
        f"{row['pid']} {label_schemes.vertebra_name(crop.vid)}: "
        f"{row['height_anterior_mm']}/{row['height_middle_mm']}/{row['height_posterior_mm']} mm, "
        f"tilt {row['tilt_deg']}°"
    )
    draw_slice(ax, image, crop.label[win[0], win[1], k], (sp[0], sp[1]), title, windowed=True)
    ax.contour(body[win[0], win[1], k].astype(float), levels=[0.5], colors=["yellow"], linewidths=2.0)
    save_figure(fig, path)


def index_text(rows: list[dict], pictures: dict, failed: dict) -> tuple[str, str]:
    """(markdown, html) of the table."""
    head = ["patient", "vertebra", "complete", *[f"{r} mm" for r in REGIONS], "tilt °", "reason / picture"]
    md = ["# Heights of the shared real masks", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = []
    for r in rows:
        pic = pictures.get((r["pid"], r["vid"]))
        last = r["reason"] if not r["complete"] else (f"![]({pic})" if pic else "")
        cells.append(
            [
                r["pid"],
                f"{label_schemes.vertebra_name(r['vid'])} ({r['vid']})",
                "yes" if r["complete"] else "**no**",
                *[str(r[f"height_{g}_mm"]) for g in REGIONS],
                str(r["tilt_deg"]),
                last,
            ]
        )
        md.append("| " + " | ".join(cells[-1]) + " |")
    for pid, message in failed.items():
        md.append(f"\n{pid}: failed: {message}")
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
        + (
            f'<td><img src="{html.escape(pictures[(r["pid"], r["vid"])])}" width="260"></td>'
            if (r["pid"], r["vid"]) in pictures
            else f"<td>{html.escape(row[-1])}</td>"
        )
        + "</tr>\n"
        for r, row in zip(rows, cells, strict=True)
    )
    fails = "".join(f"<p>{html.escape(p)}: failed: {html.escape(m)}</p>" for p, m in failed.items())
    page = (
        "<!doctype html><meta charset='utf-8'><title>Real heights</title>"
        "<h1>Heights of the shared real masks</h1><table border='1' cellpadding='3'><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + f"</tr>\n{body}</table>{fails}"
    )
    return "\n".join(md) + "\n", page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(DEFAULT_SHARED), help="the shared data folder")
    parser.add_argument("--out", default="real_heights", help="report folder")
    parser.add_argument("--spacing_mm", type=float, default=1.0, help="voxel size of the crops")
    parser.add_argument("--overwrite", action="store_true", help="redo the work folders")
    names = [c[0] for c in CASES]
    parser.add_argument("--cases", nargs="+", choices=names, default=names, help="masks to report (all)")
    opt = parser.parse_args(sys.argv[1:] if argv is None else argv)
    shared, out = Path(opt.shared), Path(opt.out)
    cases = [c for c in CASES if c[0] in opt.cases]
    missing = [m for _, m, _, _ in cases if not (shared / m).is_file()]
    if missing:
        print(f"error: {shared}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    rows, pictures, failed, seconds = [], {}, {}, {}
    for pid, mask, ct, scheme in cases:
        t0 = time.perf_counter()
        root = out / "work" / pid
        if opt.overwrite and root.exists():
            shutil.rmtree(root)
        root = prepare(out / "work", shared, pid, mask, ct)
        code, err = run_quietly(location_json_local.main, ["--dataroot", str(root), "--label_scheme", scheme])
        if code == 0:
            args = ["--dataroot", str(root), "--label_scheme", scheme, "--spacing_mm", str(opt.spacing_mm)]
            code, err = run_quietly(straighten_mask_3d.main, args + ([] if ct else ["--labels_only"]))
        if code:
            failed[pid] = err.splitlines()[-1] if err else f"exit {code}"
            continue
        store = CropStore(root, need_ct=False)
        for row in dataset_rows(root, progress=False):
            rows.append(row)
            if row["complete"]:
                name = f"{pid}_{row['vid']}.png"
                save_picture(store, f"{pid}_{row['vid']}", row, out / "pictures" / name)
                pictures[(pid, row["vid"])] = f"pictures/{name}"
        seconds[pid] = time.perf_counter() - t0
    write_text(out / "heights.csv", csv_text(rows))
    md, page = index_text(rows, pictures, failed)
    write_text(out / "index.md", md)
    write_text(out / "index.html", page)
    for r in rows:
        hts = "/".join(str(r[f"height_{g}_mm"]) for g in REGIONS) if r["complete"] else r["reason"]
        name = label_schemes.vertebra_name(r["vid"])
        tilt = f" tilt {r['tilt_deg']}" if r["tilt_deg"] != "" else ""  # a cut vertebra has none
        print(f"{r['pid']:>17} {name:>4} {'' if r['complete'] else 'CUT '}{hts}{tilt}")
    n_cut = sum(not r["complete"] for r in rows)
    per = ", ".join(f"{p} {s:.1f} s" for p, s in seconds.items())
    print(
        f"{len(rows)} vertebrae of {len(seconds)} masks ({n_cut} cut, {len(failed)} masks failed) "
        f"in {time.perf_counter() - start:.1f} s ({per}); report in {out / 'index.html'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

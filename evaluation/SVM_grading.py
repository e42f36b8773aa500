"""Genant grading of vertebrae from their RHLV with a class-balanced linear SVM.

    python evaluation/SVM_grading.py --rhlv-folder Q --output-folder S
        [--features sagittal|coronal|2.5d] [--rhlv-folder-coronal QC] [--classes genant|fracture]
        [--folds 5] [--seed 0] [--C 1.0] [--fit-splits train,val] [--test-split test] [--overwrite]

Features: the anterior, middle and posterior RHLV of ``Q/rhlv.csv`` (``sagittal``, or ``coronal``
from ``--rhlv-folder-coronal`` when given); ``2.5d`` joins a sagittal and a coronal ``rhlv.csv``
on ``vertebra`` (six features). Classes: Genant grades 0-3, or ``fracture`` (grade >= 1 vs 0).
Rows with an empty grade or RHLV are left out; a grade outside 0-3 or an RHLV that is not a finite
number (``n/a``, ``nan``, ``inf``) is an input error (one line naming the file, row and column).

Evaluation (evaluation/grading.py): stratified k-fold cross-validation (each patient's vertebrae in
one fold, ``--cv-groups patient``, the default) over the development splits
(``--fit-splits``) that scores each held-out fold, and the fixed evaluation that fits on the
development splits and scores ``--test-split``. Writes ``S/metrics.json`` (top level: the test
split's macro_f1, macro_precision, macro_recall, accuracy, per-class metrics; ``cv``: per fold,
mean, std and pooled out-of-fold), ``S/predictions.csv``, ``S/confusion_test.png`` and
``S/confusion_cv.png``. One class, or fewer vertebrae per class than folds: one line, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from data.base_dataset import SPLITS
from evaluation import grading
from evaluation.eval_io import check_row_length, csv_number, csv_text, read_csv_rows, run_script
from util.atomic import atomic_path, write_json, write_text
from util.errors import input_error

log = logging.getLogger(__name__)

FEATURE_SETS = ("sagittal", "coronal", "2.5d")
CLASS_SETS = ("genant", "fracture")
RHLV_FEATURES = tuple(f"rhlv_{r}" for r in grading.FEATURE_REGIONS)
GENANT_GRADES = (0, 1, 2, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rhlv-folder", required=True, help="folder holding rhlv.csv (sagittal)")
    parser.add_argument("--rhlv-folder-coronal", help="folder holding the coronal rhlv.csv (2.5d, coronal)")
    parser.add_argument("--output-folder", required=True, help="where metrics.json and the figures go")
    parser.add_argument("--features", choices=FEATURE_SETS, default="sagittal")
    parser.add_argument(
        "--classes", choices=CLASS_SETS, default="genant", help="grades 0-3, or fractured vs not"
    )
    parser.add_argument("--folds", type=int, default=5, help="stratified cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument(
        "--cv-groups",
        choices=("patient", "vertebra"),
        default="patient",
        help="keep each patient's vertebrae in one fold (falls back to vertebrae, and says so, "
        "where there are fewer patients than folds or a fold would train on one class)",
    )
    parser.add_argument("--C", type=float, default=1.0, dest="c", help="SVM regularisation")
    parser.add_argument("--fit-splits", default="train,val", help="development splits (fit and CV)")
    parser.add_argument("--test-split", default="test", help="the split scored by the fixed evaluation")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished output folder")
    return parser


def read_features(folder: str, prefix: str = "") -> dict[str, dict]:
    """{vertebra: {grade, split, features...}} of one rhlv.csv; rows without grade or RHLV are left out.

    An empty cell is a missing value; anything else must be a Genant grade 0-3 or a finite RHLV,
    or the file is refused with the row, column and value.
    """
    path = Path(folder) / "rhlv.csv"
    if not Path(folder).is_dir():
        raise input_error(folder, "RHLV folder not found")
    rows = read_csv_rows(path, ("vertebra", "pid", "grade", "split", *RHLV_FEATURES), "rhlv.csv")
    out, no_grade, no_value = {}, 0, 0
    for n, r in enumerate(rows, start=1):
        check_row_length(path, n, r)
        if r["grade"] == "":
            no_grade += 1
            continue
        grade = csv_number(path, n, r, "grade", int)
        if grade not in GENANT_GRADES:
            raise input_error(path, f"row {n}, column grade: {r['grade']!r} is not a Genant grade 0-3")
        if any(r[f] == "" for f in RHLV_FEATURES):
            no_value += 1
            continue
        out[r["vertebra"]] = {
            "pid": r["pid"],
            "grade": grade,
            "split": r["split"],
            **{prefix + f: csv_number(path, n, r, f) for f in RHLV_FEATURES},
        }
    if no_value:
        log.warning("%s: %d vertebrae without an RHLV value left out", path, no_value)
    if not out:
        why = "no grades (run RHLV_quantification.py with --json-path)" if no_grade else "no usable rows"
        raise input_error(path, why)
    return out


def load_table(opt: argparse.Namespace) -> tuple[dict[str, dict], list[str]]:
    """The graded vertebrae and the feature names for ``--features``."""
    if opt.features == "sagittal":
        return read_features(opt.rhlv_folder), list(RHLV_FEATURES)
    if opt.features == "coronal":
        return read_features(opt.rhlv_folder_coronal or opt.rhlv_folder), list(RHLV_FEATURES)
    if not opt.rhlv_folder_coronal:
        raise input_error(None, "--features 2.5d needs --rhlv-folder-coronal (the coronal rhlv.csv)")
    sag = read_features(opt.rhlv_folder, "sagittal_")
    cor = read_features(opt.rhlv_folder_coronal, "coronal_")
    joined = {}
    for key in sorted(set(sag) & set(cor)):
        if (sag[key]["grade"], sag[key]["split"]) != (cor[key]["grade"], cor[key]["split"]):
            raise input_error(opt.rhlv_folder_coronal, f"{key}: grade or split differs from the sagittal csv")
        joined[key] = sag[key] | cor[key]
    if not joined:
        raise input_error(opt.rhlv_folder_coronal, "no vertebra in common with the sagittal rhlv.csv")
    names = [f"{p}_{f}" for p in ("sagittal", "coronal") for f in RHLV_FEATURES]
    return joined, names


def save_confusion(path: Path, matrix: list[list[int]], labels: list[int], title: str, classes: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > m.max() / 2 else "black")
    ticks = (
        [("normal", "fractured")[c] for c in labels] if classes == "fracture" else [str(c) for c in labels]
    )
    ax.set_xticks(range(len(labels)), ticks)
    ax.set_yticks(range(len(labels)), ticks)
    noun = "class" if classes == "fracture" else "Genant grade"
    ax.set_xlabel(f"predicted {noun}")
    ax.set_ylabel(f"true {noun}")
    ax.set_title(title, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)


def table_source(opt: argparse.Namespace) -> str:
    """The rhlv.csv file(s) the table of ``--features`` comes from, for error messages."""
    sagittal = Path(opt.rhlv_folder) / "rhlv.csv"
    if opt.features == "sagittal" or not opt.rhlv_folder_coronal:
        return str(sagittal)
    coronal = Path(opt.rhlv_folder_coronal) / "rhlv.csv"
    return str(coronal) if opt.features == "coronal" else f"{sagittal} + {coronal}"


def run(opt: argparse.Namespace) -> dict:
    if not (np.isfinite(opt.c) and opt.c > 0):
        raise input_error(None, f"--C must be a finite number > 0, got {opt.c}")
    table, features = load_table(opt)
    fit_splits = [s.strip() for s in opt.fit_splits.split(",") if s.strip()]
    unknown = sorted(set(fit_splits + [opt.test_split]) - set(SPLITS))
    if unknown or opt.test_split in fit_splits:
        raise input_error(None, f"--fit-splits/--test-split must be distinct splits of {SPLITS}")
    keys_fit = [k for k, r in table.items() if r["split"] in fit_splits]
    keys_test = [k for k, r in table.items() if r["split"] == opt.test_split]
    source = table_source(opt)
    if not keys_fit:
        raise input_error(source, f"no graded vertebrae in the development split(s) {', '.join(fit_splits)}")
    if not keys_test:
        raise input_error(source, f"no graded vertebrae in the test split {opt.test_split!r}")

    def arrays(keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        x = np.array([[table[k][f] for f in features] for k in keys], dtype=np.float64)
        y = np.array([table[k]["grade"] for k in keys])
        return x, (y >= 1).astype(int) if opt.classes == "fracture" else y

    x_fit, y_fit = arrays(keys_fit)
    x_test, y_test = arrays(keys_test)
    problem = grading.class_problem(y_fit, opt.folds)
    if problem:
        raise input_error(source, f"development split(s) {'+'.join(fit_splits)}: {problem}")
    groups = np.array([table[k]["pid"] for k in keys_fit]) if opt.cv_groups == "patient" else None
    cv = grading.cross_validate(x_fit, y_fit, opt.folds, opt.seed, opt.c, groups)
    if cv["fallback"]:
        log.warning("cross-validation folds split patients (%s)", cv["fallback"])
    test, pred_test = grading.fit_and_test(x_fit, y_fit, x_test, y_test, opt.c)

    out = Path(opt.output_folder)
    pred_rows = [
        {"vertebra": k, "split": table[k]["split"], "true": int(t), "predicted": int(p), "fold": int(f)}
        for k, t, p, f in zip(keys_fit, y_fit, cv["predictions"], cv["fold"], strict=True)
    ] + [
        {"vertebra": k, "split": table[k]["split"], "true": int(t), "predicted": int(p), "fold": ""}
        for k, t, p in zip(keys_test, y_test, pred_test, strict=True)
    ]
    write_text(
        out / "predictions.csv", csv_text(pred_rows, ("vertebra", "split", "true", "predicted", "fold"))
    )
    what = f"{opt.features} RHLV, {opt.classes}"
    save_confusion(
        out / "confusion_test.png",
        test["confusion_matrix"],
        test["labels"],
        f"{opt.test_split}: {what}",
        opt.classes,
    )
    pooled = cv["pooled"]
    save_confusion(
        out / "confusion_cv.png",
        pooled["confusion_matrix"],
        pooled["labels"],
        f"{opt.folds}-fold CV ({'+'.join(fit_splits)}): {what}",
        opt.classes,
    )
    cv_json = {k: v for k, v in cv.items() if k not in ("predictions", "fold")}
    metrics = {
        **{k: test[k] for k in ("macro_f1", "macro_precision", "macro_recall", "accuracy")},
        "evaluated_on": opt.test_split,
        "features": opt.features,
        "feature_columns": features,
        "classes": opt.classes,
        "classifier": f"StandardScaler + SVC(kernel=linear, class_weight=balanced, C={opt.c})",
        "fit_splits": fit_splits,
        "n_fit": len(keys_fit),
        "test": test,
        "cv": cv_json,
    }
    write_json(out / "metrics.json", metrics)  # last: marks the folder finished
    return metrics


def main(argv: list[str] | None = None) -> int:
    opt = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    done = Path(opt.output_folder) / "metrics.json"

    def summary(m: dict, seconds: float) -> str:
        cv = m["cv"]["mean"]
        return (
            f"graded {m['test']['n']} {m['evaluated_on']} vertebrae ({m['features']}, {m['classes']}): "
            f"macro-F1 {m['macro_f1']:.3f}, accuracy {m['accuracy']:.3f}; {m['cv']['folds']}-fold CV "
            f"(folds by {m['cv']['grouped_by']}) on {m['n_fit']}: macro-F1 {cv['macro_f1']:.3f} "
            f"+- {m['cv']['std']['macro_f1']:.3f} "
            f"in {seconds:.1f} s; {done}"
        )

    return run_script(done, opt.overwrite, "grade", lambda: run(opt), summary)


if __name__ == "__main__":
    sys.exit(main())

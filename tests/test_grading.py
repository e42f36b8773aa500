"""SVM grading: cross-validation scores held-out folds, metrics, the CLI and its bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from evaluation import SVM_grading
from evaluation.grading import (
    class_problem,
    classification_metrics,
    cross_validate,
    fit_and_test,
    fold_indices,
    make_classifier,
)
from evaluation.rhlv import RHLV_COLUMNS


def test_cv_scores_the_held_out_folds_not_the_training_data():
    """Random labels with more features than samples: a linear SVM fits its training data
    perfectly, so a CV that scored training data would report 1.0; held-out data is chance."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 80))
    y = np.repeat([0, 1], 20)
    rng.shuffle(y)
    model = make_classifier(c=100.0).fit(x, y)
    assert (model.predict(x) == y).mean() == 1.0
    cv = cross_validate(x, y, folds=5, seed=0, c=100.0)
    assert cv["pooled"]["accuracy"] < 0.75
    assert cv["mean"]["accuracy"] < 0.75
    # every row is held out exactly once, and its prediction comes from a model that never saw it
    held = np.concatenate([f["held_out"] for f in cv["per_fold"]])
    assert sorted(held.tolist()) == list(range(40))
    for k, fold in enumerate(cv["per_fold"]):
        idx = np.array(fold["held_out"])
        rest = np.setdiff1d(np.arange(40), idx)
        expect = make_classifier(c=100.0).fit(x[rest], y[rest]).predict(x[idx])
        np.testing.assert_array_equal(cv["predictions"][idx], expect)
        assert (cv["fold"][idx] == k).all()


def separable(n_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = {0: 0.0, 1: 0.22, 2: 0.32, 3: 0.5}
    x, y = [], []
    for g, c in centres.items():
        a = c + rng.uniform(-0.015, 0.015, n_per_class)
        x.append(np.c_[a, a * 0.6 + rng.normal(0, 0.005, n_per_class), rng.normal(0, 0.01, n_per_class)])
        y += [g] * n_per_class
    return np.concatenate(x), np.array(y)


def test_cv_and_test_on_separable_grades():
    x, y = separable(10)
    cv = cross_validate(x, y, folds=5)
    assert cv["pooled"]["macro_f1"] > 0.9
    xt, yt = separable(5, seed=1)
    metrics, pred = fit_and_test(x, y, xt, yt)
    assert metrics["macro_f1"] > 0.9 and pred.shape == yt.shape
    assert metrics["per_class"]["3"]["support"] == 5


def test_metrics_of_known_predictions():
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), [0, 1, 2])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["0"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["2"]["support"] == 0
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_macro_averages_skip_grades_absent_from_truth_and_predictions():
    """Fit on grades 0-3, test on grades 0 and 1 only, every prediction right: the macro scores are
    1.0 (grades 2 and 3 neither occur nor are predicted), while per_class and the confusion matrix
    still list all four grades."""
    x, y = separable(10)
    xt, yt = separable(5, seed=1)
    keep = yt <= 1
    metrics, pred = fit_and_test(x, y, xt[keep], yt[keep])
    assert (pred == yt[keep]).all()
    for key in ("macro_f1", "macro_precision", "macro_recall", "accuracy"):
        assert metrics[key] == 1.0, key
    assert metrics["labels"] == [0, 1, 2, 3] and metrics["macro_labels"] == [0, 1]
    assert metrics["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert np.asarray(metrics["confusion_matrix"]).shape == (4, 4)


def test_macro_averages_count_a_grade_that_is_only_predicted():
    """True 0, 0, 1, 1; predicted 0, 2, 1, 1 with labels 0-3. Grade 2 is predicted (wrongly), so it
    counts with F1 0; grade 3 occurs nowhere and does not. Per class: 0 has P 1, R 1/2, F1 2/3;
    1 has P 1, R 1, F1 1; 2 has P 0, R 0, F1 0. Macro over {0, 1, 2}: P 2/3, R 1/2, F1 5/9."""
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), [0, 1, 2, 3])
    assert m["macro_labels"] == [0, 1, 2]
    assert m["macro_precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx(1 / 2)
    assert m["macro_f1"] == pytest.approx(5 / 9)
    assert m["per_class"]["3"]["support"] == 0 and len(m["confusion_matrix"]) == 4


def test_class_problems():
    assert "one class" in class_problem(np.zeros(10, int), 5)
    assert "too few" in class_problem(np.array([0] * 10 + [1] * 3), 5)
    assert class_problem(np.array([0] * 10 + [1] * 5), 5) is None


# --- the CLI ----------------------------------------------------------------------------------
def write_rhlv(folder, x, y, splits, prefix="v"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "rhlv.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RHLV_COLUMNS)
        w.writeheader()
        for i, (feat, g, s) in enumerate(zip(x, y, splits, strict=True)):
            row = dict.fromkeys(RHLV_COLUMNS, 20.0)
            row.update(vertebra=f"{prefix}{i}_20", pid=f"{prefix}{i}", vid=20, grade=int(g), split=s)
            row.update(
                rhlv_all=feat.mean(), rhlv_anterior=feat[0], rhlv_middle=feat[1], rhlv_posterior=feat[2]
            )
            w.writerow(row)


@pytest.fixture
def rhlv_folder(tmp_path):
    x, y = separable(10)
    xt, yt = separable(4, seed=3)
    splits = ["train" if i % 2 else "val" for i in range(len(y))] + ["test"] * len(yt)
    write_rhlv(tmp_path / "Q", np.r_[x, xt], np.r_[y, yt], splits)
    return tmp_path


def test_cli_writes_metrics_and_figures(rhlv_folder):
    s = rhlv_folder / "S"
    assert SVM_grading.main(["--rhlv-folder", str(rhlv_folder / "Q"), "--output-folder", str(s)]) == 0
    m = json.loads((s / "metrics.json").read_text())
    for key in ("macro_f1", "macro_precision", "macro_recall", "accuracy"):
        assert 0.9 <= m[key] <= 1.0
    assert m["test"]["n"] == 16 and m["n_fit"] == 40 and len(m["cv"]["per_fold"]) == 5
    assert (s / "confusion_test.png").stat().st_size > 0 and (s / "confusion_cv.png").stat().st_size > 0
    with open(s / "predictions.csv") as f:
        assert len(list(csv.DictReader(f))) == 56


def test_cli_2_5d_joins_sagittal_and_coronal(rhlv_folder):
    x, y = separable(10)
    xt, yt = separable(4, seed=3)
    splits = ["train" if i % 2 else "val" for i in range(len(y))] + ["test"] * len(yt)
    write_rhlv(rhlv_folder / "QC", np.r_[x, xt] * 0.9, np.r_[y, yt], splits)
    s = rhlv_folder / "S25"
    args = ["--rhlv-folder", str(rhlv_folder / "Q"), "--rhlv-folder-coronal", str(rhlv_folder / "QC")]
    assert SVM_grading.main([*args, "--output-folder", str(s), "--features", "2.5d"]) == 0
    m = json.loads((s / "metrics.json").read_text())
    assert len(m["feature_columns"]) == 6 and m["macro_f1"] > 0.9


def test_cli_bad_inputs_give_one_line(tmp_path, rhlv_folder, capsys):
    s = str(tmp_path / "Sbad")
    assert SVM_grading.main(["--rhlv-folder", str(tmp_path / "nope"), "--output-folder", s]) == 2
    write_rhlv(tmp_path / "one", np.zeros((12, 3)), [0] * 12, ["train"] * 6 + ["test"] * 6)
    assert SVM_grading.main(["--rhlv-folder", str(tmp_path / "one"), "--output-folder", s]) == 2
    few_y = [0] * 10 + [1] * 2 + [0, 1]
    write_rhlv(
        tmp_path / "few", np.random.default_rng(0).normal(size=(14, 3)), few_y, ["train"] * 12 + ["test"] * 2
    )
    assert SVM_grading.main(["--rhlv-folder", str(tmp_path / "few"), "--output-folder", s]) == 2
    write_rhlv(tmp_path / "notest", np.zeros((4, 3)), [0, 1, 0, 1], ["train"] * 4)
    assert SVM_grading.main(["--rhlv-folder", str(tmp_path / "notest"), "--output-folder", s]) == 2
    q = str(rhlv_folder / "Q")
    assert SVM_grading.main(["--rhlv-folder", q, "--output-folder", s, "--features", "2.5d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err), err
    assert "one class" in err[1] and "too few" in err[2] and "test split" in err[3]
    assert not (tmp_path / "Sbad" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("rhlv_middle", "n/a", "column rhlv_middle: 'n/a' is not a finite number"),
        ("rhlv_anterior", "nan", "column rhlv_anterior: 'nan' is not a finite number"),
        ("rhlv_posterior", "inf", "column rhlv_posterior: 'inf' is not a finite number"),
        ("grade", "5", "column grade: '5' is not a Genant grade 0-3"),
        ("grade", "-1", "column grade: '-1' is not a Genant grade 0-3"),
        ("grade", "mild", "column grade: 'mild' is not an integer"),
    ],
)
def test_cli_bad_cells_give_one_line_naming_row_and_column(rhlv_folder, capsys, column, value, problem):
    csv_path = rhlv_folder / "Q" / "rhlv.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[6][column] = value  # data row 7
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RHLV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    s = rhlv_folder / "S"
    assert SVM_grading.main(["--rhlv-folder", str(rhlv_folder / "Q"), "--output-folder", str(s)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {csv_path}: row 7, {problem}"]
    assert not (s / "metrics.json").exists()


def test_cli_unreadable_csv_gives_one_line(tmp_path, capsys):
    q = tmp_path / "Q"
    q.mkdir()
    (q / "rhlv.csv").write_bytes(b"\xb9\x00\xff binary, not a CSV\n")
    assert SVM_grading.main(["--rhlv-folder", str(q), "--output-folder", str(tmp_path / "S")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {q / 'rhlv.csv'}: ") and "UTF-8" in err[0]


def test_empty_cells_are_left_out_not_refused(rhlv_folder):
    """An empty grade or RHLV is a vertebra without a value (left out), not bad input."""
    csv_path = rhlv_folder / "Q" / "rhlv.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["grade"], rows[1]["rhlv_middle"] = "", ""
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RHLV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    table = SVM_grading.read_features(str(rhlv_folder / "Q"))
    assert len(table) == len(rows) - 2 and rows[0]["vertebra"] not in table


def test_folds_keep_each_patient_together():
    # 10 patients of 4 vertebrae; fractures (1) in every other patient
    groups = np.repeat([f"p{i}" for i in range(10)], 4)
    y = np.array([1 if i % 2 and j < 2 else 0 for i in range(10) for j in range(4)])
    splits, grouped_by, fallback = fold_indices(y, 5, 0, groups)
    assert (grouped_by, fallback) == ("patient", None)
    held = np.concatenate([h for _, h in splits])
    assert sorted(held) == list(range(40))
    for fit, h in splits:
        assert not set(groups[fit]) & set(groups[h])
    cv = cross_validate(np.random.default_rng(0).normal(size=(40, 3)) + y[:, None], y, 5, 0, groups=groups)
    assert cv["grouped_by"] == "patient"
    patients_of_fold = [set(groups[f["held_out"]]) for f in cv["per_fold"]]
    assert sum(len(p) for p in patients_of_fold) == 10  # each patient held out in one fold only


def test_folds_fall_back_to_vertebrae_and_say_why():
    y = np.array([0, 1] * 10)
    few = np.repeat(["a", "b", "c"], [7, 7, 6])
    _, grouped_by, fallback = fold_indices(y, 5, 0, few)
    assert grouped_by == "vertebra" and fallback == "3 patients for 5 folds"
    one = np.array(["f"] * 5 + [f"n{i}" for i in range(15)])  # every fracture in one patient
    y = np.array([1] * 5 + [0] * 15)
    _, grouped_by, fallback = fold_indices(y, 5, 0, one)
    assert grouped_by == "vertebra" and "one class" in fallback
    assert fold_indices(y, 5, 0)[1:] == ("vertebra", None)

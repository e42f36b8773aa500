"""Genant grading from RHLV features: a class-balanced linear SVM with honest evaluation.

The classifier is ``StandardScaler`` followed by ``SVC(kernel="linear", class_weight="balanced")``
in one pipeline, so every fit (each cross-validation fold, the final model) standardises with the
statistics of its own training data only. Cross-validation is stratified k-fold that scores each
held-out fold with the model fitted on the other folds (the reference scored a fixed split in every
fold and never used its held-out folds, REFERENCE.md section 12 item 12). Given ``groups`` (the
patient of each vertebra) the folds keep each patient's vertebrae together, so no fold is scored on
a patient its model was fitted on; where the groups cannot make such folds (fewer patients than
folds, or a fold whose training part would hold one class) it falls back to folds of vertebrae and
says so in ``grouped_by``. The fixed evaluation fits on the development splits and scores the test
split.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

FEATURE_REGIONS = ("anterior", "middle", "posterior")


def make_classifier(c: float = 1.0) -> Pipeline:
    """Standardise (fitted on the training data of each fit), then a class-balanced linear SVM."""
    return make_pipeline(StandardScaler(), SVC(kernel="linear", class_weight="balanced", C=float(c)))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[int]) -> dict:
    """Macro precision/recall/F1, accuracy, per-class metrics and the confusion matrix.

    The macro averages run over the classes that occur in ``y_true`` or ``y_pred`` (scikit-learn's
    convention; listed as ``macro_labels``): a grade that a test split lacks and that is never
    predicted says nothing about the classifier and does not count as a score of 0. Every class of
    ``labels`` still appears in ``per_class`` (support 0) and in the confusion matrix; a class never
    predicted has precision 0 (sklearn's ``zero_division=0``).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    pc, rc, fc, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average=None, zero_division=0
    )
    present = np.isin(labels, np.union1d(y_true, y_pred))
    return {
        "macro_f1": float(fc[present].mean()),
        "macro_precision": float(pc[present].mean()),
        "macro_recall": float(rc[present].mean()),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "n": int(y_true.size),
        "per_class": {
            str(c): {
                "precision": float(pc[i]),
                "recall": float(rc[i]),
                "f1": float(fc[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(labels)
        },
        "labels": [int(c) for c in labels],
        "macro_labels": [int(c) for c, used in zip(labels, present, strict=True) if used],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def class_problem(y: np.ndarray, folds: int) -> str | None:
    """Why ``y`` cannot be graded with stratified ``folds``-fold CV, or None if it can."""
    classes, counts = np.unique(np.asarray(y), return_counts=True)
    if classes.size < 2:
        only = f" (grade {classes[0]})" if classes.size else ""
        return f"only one class{only}; grading needs vertebrae of at least two grades"
    if folds < 2:
        return f"--folds must be at least 2, got {folds}"
    few = [f"grade {c}: {n}" for c, n in zip(classes, counts, strict=True) if n < folds]
    if few:
        return (
            f"too few vertebrae per class for stratified {folds}-fold cross-validation ({', '.join(few)}; "
            f"each class needs at least {folds}); lower --folds or use --classes fracture"
        )
    return None


def fold_indices(
    y: np.ndarray, folds: int, seed: int, groups: np.ndarray | None = None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str, str | None]:
    """The (fit, held-out) row indices of each fold, what they are grouped by (``patient`` or
    ``vertebra``) and, after a fall-back from patients to vertebrae, why."""
    y = np.asarray(y)
    rows = np.zeros((y.size, 1))
    if groups is not None:
        patients = np.unique(groups).size
        if patients < folds:
            why = f"{patients} patients for {folds} folds"
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            splits = list(splitter.split(rows, y, groups))
            if all(np.unique(y[fit]).size > 1 for fit, _ in splits):
                return splits, "patient", None
            why = "holding a patient out leaves a fold's training part with one class"
    else:
        why = None
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(rows, y)), "vertebra", why


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    groups: np.ndarray | None = None,
) -> dict:
    """Stratified k-fold CV that scores each held-out fold with a model fitted on the other folds;
    with ``groups`` (one patient id per row) a patient's rows stay in one fold (:func:`fold_indices`).

    Returns:
        ``per_fold`` metrics (each with its ``held_out`` row indices), their ``mean`` and ``std``,
        ``pooled`` metrics of all out-of-fold predictions, ``predictions`` (one per row) with
        ``fold`` (the fold that held each row out), ``grouped_by`` and ``fallback`` (why patients
        could not be kept together, or None).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    problem = class_problem(y, folds)
    if problem:
        raise ValueError(problem)
    labels = sorted(int(v) for v in np.unique(y))
    predictions = np.empty_like(y)
    fold_of = np.empty(y.size, dtype=np.int64)
    per_fold = []
    splits, grouped_by, fallback = fold_indices(y, folds, seed, groups)
    for k, (fit_idx, held_idx) in enumerate(splits):
        model = make_classifier(c).fit(x[fit_idx], y[fit_idx])
        pred = model.predict(x[held_idx])
        predictions[held_idx] = pred
        fold_of[held_idx] = k
        metrics = classification_metrics(y[held_idx], pred, labels)
        metrics["held_out"] = held_idx.tolist()
        per_fold.append(metrics)
    keys = ("macro_f1", "macro_precision", "macro_recall", "accuracy")
    return {
        "folds": folds,
        "seed": seed,
        "grouped_by": grouped_by,
        "fallback": fallback,
        "per_fold": per_fold,
        "mean": {k: float(np.mean([m[k] for m in per_fold])) for k in keys},
        "std": {k: float(np.std([m[k] for m in per_fold])) for k in keys},
        "pooled": classification_metrics(y, predictions, labels),
        "predictions": predictions,
        "fold": fold_of,
    }


def fit_and_test(
    x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, c: float = 1.0
) -> tuple[dict, np.ndarray]:
    """Fit on the development data, score the test data; returns (metrics, test predictions)."""
    model = make_classifier(c).fit(np.asarray(x_fit, dtype=np.float64), np.asarray(y_fit))
    pred = model.predict(np.asarray(x_test, dtype=np.float64))
    labels = sorted(int(v) for v in np.union1d(np.unique(y_fit), np.unique(y_test)))
    return classification_metrics(y_test, pred, labels), pred


__all__ = [
    "FEATURE_REGIONS",
    "class_problem",
    "classification_metrics",
    "cross_validate",
    "fit_and_test",
    "make_classifier",
]

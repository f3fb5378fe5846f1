"""Slide-level scoring from the features ``hpcpath infer`` puts in its run table.

* proliferation score (1, 2, 3; TUPAC16 task 1) from mitosis features: detections per mm^2
  of tissue, the densest 2 mm^2 ("10 high-power fields") count, the detection count;
* tumour / no tumour from heatmap features: max, top-k mean and mean probability, the
  fraction of windows above the threshold.

The classifier is a scikit-learn SVM (RBF kernel, balanced class weights) on standardised
features.  It is scored by stratified k-fold cross-validated predictions (every slide is
predicted by a model that never saw it): accuracy and quadratic-weighted Cohen's kappa (the
TUPAC16 metric) for proliferation, accuracy and AUC for tumour; then refitted on every
labelled slide, to be saved and applied to new ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hpcpath.errors import HpcpathError, MetricError

__all__ = ["PROLIFERATION_FEATURES", "TUMOUR_FEATURES", "SlideScores", "score_slides",
           "save_classifier", "load_classifier", "classify_slides"]

_FORMAT = "hpcpath-slide-classifier/1"

PROLIFERATION_FEATURES = ("detections_per_mm2", "hpf10_max", "detections")
TUMOUR_FEATURES = ("max_prob", "topk_mean", "mean_prob", "positive_fraction")
_POSITIVE = {"1", "1.0", "true", "yes", "tumor", "tumour", "positive", "metastasis", "metastases"}
_NEGATIVE = {"0", "0.0", "false", "no", "normal", "negative", "none"}


@dataclass
class SlideScores:
    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]
    estimator: Any
    features: tuple[str, ...]
    target: str


def _features(rows: list[dict], feats: Sequence[str], target: str, summary) -> np.ndarray:
    """The (slides, features) matrix of run-table rows; a missing value is a one-line error."""
    X = np.empty((len(rows), len(feats)))
    for i, r in enumerate(rows):
        for j, f in enumerate(feats):
            try:
                X[i, j] = float(r[f])
            except (KeyError, ValueError):
                raise HpcpathError(f"slide {r['slide_id']!r} has no {f!r} (was the run made with a "
                                   f"{'points' if target == 'proliferation' else 'heatmap'} model?)",
                                   summary) from None
    return X


def _complete_rows(summary) -> list[dict]:
    from hpcpath.files import read_table

    rows = [r for r in read_table(summary) if r.get("status") == "complete"]
    if not rows:
        raise HpcpathError("no complete slide rows (is this an hpcpath infer summary.csv?)", summary)
    return rows


def _binary(value, table) -> int:
    v = str(value).strip().lower()
    if v in _POSITIVE:
        return 1
    if v in _NEGATIVE:
        return 0
    raise HpcpathError(f"label {value!r} is not tumour/normal (1/0, tumor/normal, true/false)", table)


def score_slides(summary: str | os.PathLike, labels: str | os.PathLike, *,
                 target: str = "proliferation", features: Sequence[str] | None = None,
                 folds: int = 5, seed: int = 0, id_column: str | None = None,
                 label_column: str | None = None) -> SlideScores:
    """Fit and cross-validate the slide classifier on ``summary`` (an infer ``summary.csv``)
    joined with the label table ``labels`` (slide id -> label) by slide id."""
    from hpcpath.annotations import read_label_table
    from hpcpath.evaluate.roc import roc_auc
    try:
        from sklearn.metrics import cohen_kappa_score, confusion_matrix
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC
    except ImportError:
        raise HpcpathError("slide-level scoring needs scikit-learn: pip install scikit-learn") from None

    if target not in ("proliferation", "tumor"):
        raise HpcpathError(f"unknown target {target!r}; use proliferation or tumor")
    feats = tuple(features or (PROLIFERATION_FEATURES if target == "proliferation" else TUMOUR_FEATURES))
    rows = _complete_rows(summary)
    unknown = [f for f in feats if f not in rows[0]]
    if unknown:
        raise HpcpathError(f"no column {unknown[0]!r} (columns: {', '.join(rows[0])})", summary)
    table = read_label_table(labels, id_column, label_column)
    rows = [r for r in rows if r["slide_id"] in table]
    if not rows:
        raise HpcpathError("no slide of the summary has a label", labels)
    X = _features(rows, feats, target, summary)
    if target == "proliferation":
        try:
            y = np.array([int(round(float(table[r["slide_id"]]))) for r in rows])
        except ValueError:
            raise HpcpathError("proliferation labels must be numbers (1, 2, 3)", labels) from None
    else:
        y = np.array([_binary(table[r["slide_id"]], labels) for r in rows])
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise MetricError(f"every labelled slide has label {classes[0]}; need two classes or more")
    k = min(folds, int(counts.min()))
    if k < 2:
        raise MetricError(f"label {classes[counts.argmin()]} has {counts.min()} slide; cross-validation "
                          "needs at least 2 slides of every label")
    model = make_pipeline(StandardScaler(), SVC(kernel="rbf", C=1.0, class_weight="balanced",
                                                random_state=seed))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pred = cross_val_predict(model, X, y, cv=cv)
    metrics: dict[str, Any] = {
        "target": target, "features": list(feats), "slides": len(y), "folds": k,
        "classes": classes.tolist(), "accuracy": float((pred == y).mean()),
        "confusion": confusion_matrix(y, pred, labels=classes).tolist(),
    }
    score = None
    if target == "proliferation":
        metrics["kappa_quadratic"] = float(cohen_kappa_score(y, pred, weights="quadratic"))
    else:
        score = cross_val_predict(model, X, y, cv=cv, method="decision_function")
        metrics["auc"] = roc_auc(y, score)
    model.fit(X, y)
    preds = [{"slide_id": r["slide_id"], "label": int(t), "cv_prediction": int(p),
              **({"cv_score": float(s)} if score is not None else {})}
             for r, t, p, s in zip(rows, y, pred, score if score is not None else [None] * len(y))]
    return SlideScores(metrics, preds, model, feats, target)


def save_classifier(path: str | os.PathLike, scores: SlideScores) -> None:
    """Write the refitted classifier, with its target and feature list, for ``classify_slides``."""
    from hpcpath import signing
    from hpcpath.files import write_atomic

    write_atomic(path, signing.dumps({"format": _FORMAT, "target": scores.target,
                                      "features": list(scores.features), "estimator": scores.estimator}))


def load_classifier(path: str | os.PathLike) -> dict[str, Any]:
    """A classifier written by ``save_classifier``: a signed pickle, checked before it is
    unpickled (:mod:`hpcpath.signing`), so a file hpcpath did not write runs no code."""
    from hpcpath import signing

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise HpcpathError("slide classifier not found", path) from None
    try:
        doc = signing.loads(data, path)
    except HpcpathError:
        raise
    except Exception as exc:  # unpickling errors come in many types
        raise HpcpathError(f"not a slide classifier ({type(exc).__name__})", path) from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise HpcpathError("not an hpcpath slide classifier (written by `hpcpath evaluate slides -o`)", path)
    return doc


def classify_slides(classifier: str | os.PathLike, summary: str | os.PathLike) -> list[dict[str, Any]]:
    """Apply a saved slide classifier to the complete slides of a new run's ``summary.csv``:
    ``[{slide_id, prediction[, score]}]`` (score: SVM decision value, tumour targets)."""
    doc = load_classifier(classifier)
    rows = _complete_rows(summary)
    X = _features(rows, doc["features"], doc["target"], summary)
    model = doc["estimator"]
    pred = model.predict(X)
    out = [{"slide_id": r["slide_id"], "prediction": int(p)} for r, p in zip(rows, pred)]
    if doc["target"] == "tumor":
        for rec, s in zip(out, model.decision_function(X)):
            rec["score"] = float(s)
    return out

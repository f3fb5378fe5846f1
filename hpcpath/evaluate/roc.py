"""ROC curves and AUC, tie-aware, with no scikit-learn needed at run time.

Tied scores form one ROC step that moves diagonally (the trapezoid rule), which equals the
Mann-Whitney statistic with ties counted as half a win; that is what
``sklearn.metrics.roc_auc_score`` computes, and the tests hold this module to it within 1e-9.
The AUC is summed from integer counts and divided once, so it is exact to one rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpcpath.evaluate._common import MetricError

__all__ = ["roc_curve", "roc_auc", "per_class_auc", "PerClassAUC"]


def _check(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    """Labels as bool (from bool or 0/1) and finite float scores of the same length."""
    y = np.asarray(y_true).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise MetricError(f"y_true has {y.size} labels but scores has {s.size} values")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise MetricError("y_true must be 0/1 or bool; map your labels first, e.g. y == pos")
        y = y.astype(bool)
    if not np.isfinite(s).all():
        raise MetricError("scores contain NaN or inf; an AUC over them is undefined")
    return y, s


def _counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative TP and FP counts at each unique score, highest score first."""
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps, fps, s[last]


def _need_both_classes(n_pos: int, n_neg: int) -> None:
    if n_pos == 0 or n_neg == 0:
        only = "negatives" if n_pos == 0 else "positives"
        raise MetricError(f"ROC AUC needs positive and negative samples; y_true has only {only}")


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per unique score plus the (0, 0) start.

    Like sklearn with ``drop_intermediate=False``: ``thresholds[0]`` is ``inf`` and a sample is
    called positive when ``score >= threshold``.
    """
    y, s = _check(y_true, scores)
    tps, fps, thr = _counts(y, s)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    _need_both_classes(n_pos, n_neg)
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, thr]


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve; raises ``MetricError`` when only one class is present."""
    y, s = _check(y_true, scores)
    tps, fps, _ = _counts(y, s)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    _need_both_classes(n_pos, n_neg)
    d_tp = np.diff(tps, prepend=0)
    d_fp = np.diff(fps, prepend=0)
    twice = int((d_fp * (2 * (tps - d_tp) + d_tp)).sum())  # trapezoids, doubled to stay integer
    return twice / (2.0 * n_pos * n_neg)


@dataclass(frozen=True)
class PerClassAUC:
    """AUC per class (NaN where a class has a single label value) and their mean over the rest."""

    auc: dict[str, float]
    mean: float
    skipped: tuple[str, ...]


def per_class_auc(Y, S, names: Sequence[str] | None = None) -> PerClassAUC:
    """One-vs-rest AUC per column of multi-hot ``Y`` ``(N, C)`` against scores ``S`` ``(N, C)``.

    A column that is all 0 or all 1 has no AUC: it is reported NaN, listed in ``skipped`` and left
    out of ``mean`` (the macro average; NaN if every class is skipped).
    """
    Y, S = np.asarray(Y), np.asarray(S, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise MetricError(f"Y and S must both be (N, C); got {Y.shape} and {S.shape}")
    names = [str(i) for i in range(Y.shape[1])] if names is None else [str(n) for n in names]
    if len(names) != Y.shape[1]:
        raise MetricError(f"{len(names)} names for {Y.shape[1]} classes")
    auc: dict[str, float] = {}
    skipped = []
    for j, name in enumerate(names):
        y, s = _check(Y[:, j], S[:, j])
        if y.all() or not y.any():
            auc[name] = float("nan")
            skipped.append(name)
        else:
            auc[name] = roc_auc(y, s)
    valid = [v for v in auc.values() if not np.isnan(v)]
    return PerClassAUC(auc, float(np.mean(valid)) if valid else float("nan"), tuple(skipped))

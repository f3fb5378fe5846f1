"""Epoch metrics from gathered predictions: loss, AUC (per class for multi-label), precision,
recall and F1 at 0.5, and the F1-maximising threshold.  Pure NumPy."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpcpath.evaluate import MetricError, roc_auc

__all__ = ["epoch_metrics", "max_f1"]


def max_f1(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over every distinct score, calling ``p >= threshold`` positive."""
    y, p = np.asarray(y).ravel().astype(bool), np.asarray(p, np.float64).ravel()
    if not y.any():
        return float("nan"), float("nan")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), len(ps) - 1]
    tp = np.cumsum(ys)[last]
    k = last + 1
    f1 = 2 * tp / (k + y.sum())
    i = int(np.argmax(f1))
    return float(f1[i]), float(ps[last[i]])


def _auc(y, p) -> float:
    try:
        return roc_auc(y, p)
    except MetricError:
        return float("nan")


def epoch_metrics(y: np.ndarray, p: np.ndarray, classes: Sequence[str], prefix: str = "val_") -> dict:
    """``y`` 0/1 and ``p`` probabilities, both ``(N, C)``."""
    y = np.asarray(y).reshape(len(y), -1)
    p = np.asarray(p, np.float64).reshape(len(p), -1)
    out: dict[str, float] = {}
    if y.shape[1] == 1:
        out[f"{prefix}auc"] = _auc(y[:, 0], p[:, 0])
    else:
        aucs = [_auc(y[:, i], p[:, i]) for i in range(y.shape[1])]
        for c, a in zip(classes, aucs):
            out[f"{prefix}auc_{c}"] = a
        out[f"{prefix}auc"] = float(np.nanmean(aucs)) if not np.isnan(aucs).all() else float("nan")
    pred = p >= 0.5
    tp = float((pred & (y > 0)).sum())
    fp = float((pred & (y == 0)).sum())
    fn = float((~pred & (y > 0)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    out[f"{prefix}precision"] = prec
    out[f"{prefix}recall"] = rec
    out[f"{prefix}f1"] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    out[f"{prefix}max_f1"], out[f"{prefix}max_f1_threshold"] = max_f1(y, p)
    return out

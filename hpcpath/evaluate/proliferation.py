"""Slide proliferation from mitosis detections (TUPAC16 task 1), and its agreement with a
slide label table.

Definition implemented here (TUPAC16 scores the mitotic count "in 10 consecutive high-power
fields" of the most active region, with 10 HPF taken as 2 mm^2, as in AMIDA13):

* **mitoses per 10 HPF** = the most detections inside any axis-aligned square of 2 mm^2
  (side sqrt(2) mm, i.e. ``1414.2 / mpp`` level-0 pixels) placed *anywhere* on the slide,
  counted exactly (:func:`hpcpath.detect.densest_count`); a square, not ten circles,
  and no restriction to tumour tissue (the model's detections are assumed to lie there);
* **proliferation score** 1-3 from that count with the cut points ``(6, 12)``: ``<= 6`` -> 1,
  ``7..12`` -> 2, ``>= 13`` -> 3 (the mitotic-activity-index cut points for 2 mm^2 of the
  Dutch breast-grading guideline; pass ``cuts=`` for another table, e.g. (7, 14)).

Agreement with labels: quadratic-weighted Cohen's kappa between the predicted and labelled
scores (TUPAC16's task-1 metric) and Spearman's rank correlation between the mitosis count
and the label (TUPAC16's task-2 metric, for a molecular score column).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hpcpath.errors import MetricError

__all__ = ["HPF10_MM2", "PROLIFERATION_CUTS", "hpf10_side_px", "mitoses_per_10hpf",
           "proliferation_score", "quadratic_kappa", "agreement"]

HPF10_MM2 = 2.0
PROLIFERATION_CUTS = (6, 12)


def hpf10_side_px(mpp: float) -> float:
    """Side of the 2 mm^2 square in level-0 pixels at ``mpp`` microns per pixel."""
    if not (mpp and np.isfinite(mpp) and mpp > 0):
        raise MetricError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    return math.sqrt(HPF10_MM2) * 1000.0 / float(mpp)


def mitoses_per_10hpf(xy, mpp: float) -> int:
    """Most detections in any 2 mm^2 square of the slide (level-0 ``(N, 2)`` x, y)."""
    from hpcpath.detect import densest_count

    return densest_count(np.asarray(xy, np.float64).reshape(-1, 2), hpf10_side_px(mpp))


def proliferation_score(count: float, cuts: Sequence[float] = PROLIFERATION_CUTS) -> int:
    """1, 2 or 3: ``count <= cuts[0]`` -> 1, ``<= cuts[1]`` -> 2, else 3."""
    lo, hi = (float(c) for c in cuts)
    if not lo < hi:
        raise MetricError(f"proliferation cut points must rise, got {tuple(cuts)}")
    return 1 if count <= lo else 2 if count <= hi else 3


def quadratic_kappa(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray,
                    classes: Sequence[int] = (1, 2, 3)) -> float | None:
    """Cohen's kappa with quadratic weights over ``classes`` (None when undefined: every
    rating the same class on both sides)."""
    ra, rb = np.asarray(a, np.int64), np.asarray(b, np.int64)
    cls = sorted(set(classes) | set(ra.tolist()) | set(rb.tolist()))
    k = len(cls)
    idx = {c: i for i, c in enumerate(cls)}
    obs = np.zeros((k, k))
    for x, y in zip(ra, rb):
        obs[idx[int(x)], idx[int(y)]] += 1
    n = obs.sum()
    if n == 0:
        return None
    w = (np.subtract.outer(np.arange(k), np.arange(k)) ** 2) / max((k - 1) ** 2, 1)
    exp = np.outer(obs.sum(1), obs.sum(0)) / n
    den = (w * exp).sum()
    return None if den == 0 else float(1 - (w * obs).sum() / den)


def agreement(counts: Mapping[str, float], labels: Mapping[str, Any], cuts: Sequence[float] = PROLIFERATION_CUTS
              ) -> dict[str, Any]:
    """Predicted scores against a label table (slide id -> 1-3, or a number for Spearman
    only): ``slides``, ``kappa_quadratic`` (None with a reason when undefined or the labels
    are not 1-3), ``spearman`` (count vs label) and the confusion matrix."""
    ids = sorted(s for s in counts if s in labels)
    out: dict[str, Any] = {"slides": len(ids), "cuts": list(cuts), "kappa_quadratic": None,
                           "spearman": None}
    if not ids:
        out["why"] = "no slide of the run has a label"
        return out
    try:
        lab = np.array([float(labels[s]) for s in ids])
    except (TypeError, ValueError):
        out["why"] = "labels are not numbers"
        return out
    cnt = np.array([float(counts[s]) for s in ids])
    pred = np.array([proliferation_score(c, cuts) for c in cnt])
    if np.all(np.isin(lab, (1, 2, 3))):
        truth = lab.astype(np.int64)
        out["kappa_quadratic"] = quadratic_kappa(truth, pred)
        out["confusion"] = [[int(((truth == i) & (pred == j)).sum()) for j in (1, 2, 3)] for i in (1, 2, 3)]
        out["accuracy"] = float((truth == pred).mean())
        if out["kappa_quadratic"] is None:
            out["kappa_why"] = "every slide has the same score in both (kappa undefined)"
    else:
        out["kappa_why"] = "labels are not proliferation scores 1-3 (Spearman only)"
    if len(ids) >= 2 and np.ptp(cnt) > 0 and np.ptp(lab) > 0:
        from scipy.stats import spearmanr

        out["spearman"] = float(spearmanr(cnt, lab).statistic)
    return out

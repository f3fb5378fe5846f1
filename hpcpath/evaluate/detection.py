"""Point-detection scoring by the TUPAC16 / AMIDA13 mitosis rule.

A prediction is a true positive when it lies within ``radius`` (inclusive, ``<=``) of a
ground-truth point that no other prediction has claimed.  Each ground truth counts at most
once: a second hit on an already matched truth is a false positive.  Which prediction gets
which truth is decided by an optimal bipartite assignment (see ``_matching``): the number of
TPs is the maximum possible (a greedy nearest-first rule can lose one when a prediction sits
between two truths), and among maximum matchings the total distance is least.  Exact ties
are settled by the deterministic solver, so the same input always gives the same pairs.

Scores are aggregated globally (micro): TP, FP and FN are summed over all images first and
precision/recall/F1 computed once.  Undefined ratios count as 0: precision with no predictions,
recall with no ground truth, F1 when both are 0 (sklearn's ``zero_division=0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hpcpath.evaluate._common import MetricError, as_points, as_radius, per_image, safe_ratio
from hpcpath.evaluate._matching import optimal_pairs, pairs_within, tp_gains

__all__ = [
    "TUPAC_RADIUS_PX",
    "TUPAC_MPP",
    "Match",
    "DetectionScores",
    "ThresholdResult",
    "radius_for_mpp",
    "match_detections",
    "f1_scores",
    "best_threshold",
]

TUPAC_RADIUS_PX = 30.0  # the published rule: 30 px ...
TUPAC_MPP = 0.25  # ... at 0.25 um/px, i.e. 7.5 um


def radius_for_mpp(mpp: float, radius_px: float = TUPAC_RADIUS_PX, ref_mpp: float = TUPAC_MPP):
    """The matching radius in pixels at ``mpp``, keeping the rule's physical size fixed.

    >>> radius_for_mpp(0.25), radius_for_mpp(0.5), radius_for_mpp(0.125)
    (30.0, 15.0, 60.0)
    """
    mpp = float(mpp)
    if not np.isfinite(mpp) or mpp <= 0:
        raise MetricError(f"mpp must be a positive number of microns per pixel, got {mpp!r}")
    return float(radius_px) * float(ref_mpp) / mpp


@dataclass(frozen=True, eq=False)
class Match:
    """One image's matching: ``pairs`` is ``(K, 2)`` ``(pred_index, truth_index)``, K = TP."""

    pairs: np.ndarray
    n_pred: int
    n_truth: int

    @property
    def tp(self) -> int:
        return len(self.pairs)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_truth - self.tp

    @property
    def pred_is_tp(self) -> np.ndarray:
        """Boolean per prediction: matched to a truth."""
        out = np.zeros(self.n_pred, dtype=bool)
        out[self.pairs[:, 0]] = True
        return out

    @property
    def truth_is_hit(self) -> np.ndarray:
        """Boolean per ground truth: found by some prediction."""
        out = np.zeros(self.n_truth, dtype=bool)
        out[self.pairs[:, 1]] = True
        return out


@dataclass(frozen=True)
class DetectionScores:
    """Globally aggregated counts and the ratios computed from them (undefined -> 0.0)."""

    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> DetectionScores:
        return cls(
            precision=safe_ratio(tp, tp + fp),
            recall=safe_ratio(tp, tp + fn),
            f1=safe_ratio(2 * tp, 2 * tp + fp + fn),  # = 2PR/(P+R) wherever that is defined
            tp=int(tp),
            fp=int(fp),
            fn=int(fn),
        )


@dataclass(frozen=True, eq=False)
class ThresholdResult:
    """Best score threshold (keep predictions with ``score >= threshold``) and the whole curve.

    ``curve`` maps ``threshold, precision, recall, f1, tp, fp, fn`` to arrays, one entry per
    unique score, thresholds descending.
    """

    threshold: float
    f1: float
    precision: float
    recall: float
    curve: dict[str, np.ndarray] = field(repr=False)


def match_detections(pred_xy, truth_xy, radius_px: float) -> Match:
    """Match predictions to ground-truth points by the TUPAC16 rule (maximum TPs)."""
    pred = as_points(pred_xy, 2, "pred_xy")
    truth = as_points(truth_xy, 2, "truth_xy")
    r = as_radius(radius_px)
    pi, ti, d = pairs_within(pred, truth, r)
    return Match(optimal_pairs(pi, ti, d, len(pred), len(truth), r), len(pred), len(truth))


def f1_scores(preds: Sequence, truths: Sequence, radius_px) -> DetectionScores:
    """Precision, recall, F1 over many images: counts summed first, ratios computed once.

    ``preds`` and ``truths`` hold one ``(N_i, 2)`` array per image; ``radius_px`` is one radius
    or one per image (images at different MPPs, see ``radius_for_mpp``).
    """
    if len(preds) != len(truths):
        raise MetricError(f"{len(preds)} prediction sets for {len(truths)} ground-truth sets")
    radii = per_image(radius_px, len(preds), "radius_px")
    tp = fp = fn = 0
    for p, t, r in zip(preds, truths, radii, strict=True):
        m = match_detections(p, t, r)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return DetectionScores.from_counts(tp, fp, fn)


def best_threshold(preds: Sequence, truths: Sequence, radius_px) -> ThresholdResult:
    """The score threshold with the highest global F1, searched over every unique score.

    ``preds`` holds one ``(N_i, 3)`` array ``x, y, score`` per image.  Each image is matched
    once, incrementally in score order (``_matching.tp_gains``), so the curve costs about one
    matching, not one per threshold.  TP at each threshold equals ``match_detections`` on the
    kept predictions.  Ties in F1 go to the highest threshold (fewest detections).
    """
    if len(preds) != len(truths):
        raise MetricError(f"{len(preds)} prediction sets for {len(truths)} ground-truth sets")
    radii = per_image(radius_px, len(preds), "radius_px")
    scores, gains, n_truth = [], [], 0
    for p, t, r in zip(preds, truths, radii, strict=True):
        p = as_points(p, 3, "preds[i]")
        t = as_points(t, 2, "truths[i]")
        pi, ti, _ = pairs_within(p[:, :2], t, as_radius(r))
        order = np.argsort(-p[:, 2], kind="stable")
        scores.append(p[:, 2])
        gains.append(tp_gains(pi, ti, order, len(t)))
        n_truth += len(t)
    score = np.concatenate(scores) if scores else np.zeros(0)
    if len(score) == 0:
        raise MetricError("best_threshold needs at least one scored prediction")
    gain = np.concatenate(gains)
    order = np.argsort(-score, kind="stable")
    score, gain = score[order], gain[order]
    last = np.r_[np.flatnonzero(np.diff(score) != 0), len(score) - 1]  # end of each tie group
    tp = np.cumsum(gain)[last]
    kept = last + 1
    fp, fn = kept - tp, n_truth - tp
    precision = tp / kept
    recall = tp / n_truth if n_truth else np.zeros(len(tp))
    f1 = 2 * tp / (2 * tp + fp + fn)  # denominator >= kept >= 1
    best = int(np.argmax(f1))
    curve = {
        "threshold": score[last],
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }
    thr = float(score[last][best])
    return ThresholdResult(thr, float(f1[best]), float(precision[best]), float(recall[best]), curve)

"""Point-detection scoring by the TUPAC16 / AMIDA13 mitosis rule.

A prediction is a true positive when it lies within ``radius`` (inclusive, ``<=``) of a
ground-truth point that no other prediction has claimed.  Each ground truth counts at most
once: a second hit on an already matched truth is a false positive.  Which prediction gets
which truth is decided by an optimal bipartite assignment (see ``_matching``): the number of
TPs is the maximum possible (a greedy nearest-first rule can lose one when a prediction sits
between two truths), and among maximum matchings the total distance is least.  Exact ties
are settled by the deterministic solver, so the same input always gives the same pairs.

``matching="any"`` is deep-histopath's rule (the seeds' own evaluation,
``deephistopath/evaluation.py::prepare_f1_inputs``): every truth with at least one prediction
within ``radius`` is one TP however many predictions sit there, none of those predictions is
a FP, a prediction near no truth is a FP and a truth with none near it a FN.  Without
duplicate hits both rules agree; with them, ``any`` scores higher.

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
    "MATCHING_RULES",
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
MATCHING_RULES = ("one-to-one", "any")  # the first is the default


def _check_rule(matching: str) -> str:
    if matching not in MATCHING_RULES:
        raise MetricError(f"unknown matching rule {matching!r}; use one of {', '.join(MATCHING_RULES)}")
    return matching


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


@dataclass(frozen=True, eq=False)
class AnyMatch:
    """One image under the ``any`` rule: which predictions lie near some truth, which truths
    have some prediction near them."""

    pred_near_truth: np.ndarray
    truth_is_hit: np.ndarray

    @property
    def tp(self) -> int:
        return int(self.truth_is_hit.sum())

    @property
    def fp(self) -> int:
        return int((~self.pred_near_truth).sum())

    @property
    def fn(self) -> int:
        return int((~self.truth_is_hit).sum())

    @property
    def pred_is_tp(self) -> np.ndarray:
        return self.pred_near_truth


def match_detections(pred_xy, truth_xy, radius_px: float, matching: str = "one-to-one"):
    """Match predictions to ground-truth points: ``one-to-one`` (TUPAC16; maximum TPs, a
    second hit on a truth is a FP) gives a :class:`Match`, ``any`` (deep-histopath) an
    :class:`AnyMatch`; both have ``tp``, ``fp``, ``fn``, ``pred_is_tp`` and ``truth_is_hit``."""
    _check_rule(matching)
    pred = as_points(pred_xy, 2, "pred_xy")
    truth = as_points(truth_xy, 2, "truth_xy")
    r = as_radius(radius_px)
    pi, ti, d = pairs_within(pred, truth, r)
    if matching == "any":
        near = np.zeros(len(pred), bool)
        near[pi] = True
        hit = np.zeros(len(truth), bool)
        hit[ti] = True
        return AnyMatch(near, hit)
    return Match(optimal_pairs(pi, ti, d, len(pred), len(truth), r), len(pred), len(truth))


def f1_scores(preds: Sequence, truths: Sequence, radius_px, matching: str = "one-to-one"
              ) -> DetectionScores:
    """Precision, recall, F1 over many images: counts summed first, ratios computed once.

    ``preds`` and ``truths`` hold one ``(N_i, 2)`` array per image; ``radius_px`` is one radius
    or one per image (images at different MPPs, see ``radius_for_mpp``).
    """
    if len(preds) != len(truths):
        raise MetricError(f"{len(preds)} prediction sets for {len(truths)} ground-truth sets")
    radii = per_image(radius_px, len(preds), "radius_px")
    tp = fp = fn = 0
    for p, t, r in zip(preds, truths, radii, strict=True):
        m = match_detections(p, t, r, matching)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return DetectionScores.from_counts(tp, fp, fn)


def _any_events(p: np.ndarray, t: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Under the ``any`` rule, what each threshold keeps: ``(score, dtp, dfp)`` events.  A truth
    becomes a TP at the best score among the predictions near it; a prediction near no truth
    is a FP from its own score on."""
    pi, ti, _ = pairs_within(p[:, :2], t, r)
    near = np.zeros(len(p), bool)
    near[pi] = True
    best = np.full(len(t), -np.inf)
    np.maximum.at(best, ti, p[pi, 2])
    hit = np.isfinite(best)
    score = np.r_[best[hit], p[~near, 2]]
    dtp = np.r_[np.ones(hit.sum(), np.int64), np.zeros((~near).sum(), np.int64)]
    return score, dtp, 1 - dtp


def best_threshold(preds: Sequence, truths: Sequence, radius_px, matching: str = "one-to-one"
                   ) -> ThresholdResult:
    """The score threshold with the highest global F1, searched over every unique score.

    ``preds`` holds one ``(N_i, 3)`` array ``x, y, score`` per image.  Each image is matched
    once, incrementally in score order (``_matching.tp_gains``), so the curve costs about one
    matching, not one per threshold.  TP at each threshold equals ``match_detections`` on the
    kept predictions.  Ties in F1 go to the highest threshold (fewest detections).
    """
    if len(preds) != len(truths):
        raise MetricError(f"{len(preds)} prediction sets for {len(truths)} ground-truth sets")
    radii = per_image(radius_px, len(preds), "radius_px")
    if _check_rule(matching) == "any":
        return _best_threshold_any(preds, truths, radii)
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


def _best_threshold_any(preds: Sequence, truths: Sequence, radii: list) -> ThresholdResult:
    """:func:`best_threshold` under the ``any`` rule, from per-image events (a truth's best
    nearby score, an isolated prediction's score); every unique prediction score is a
    candidate threshold, as for ``one-to-one``."""
    ev_s, ev_tp, ev_fp, allscores, n_truth = [], [], [], [], 0
    for p, t, r in zip(preds, truths, radii, strict=True):
        p = as_points(p, 3, "preds[i]")
        t = as_points(t, 2, "truths[i]")
        s, dtp, dfp = _any_events(p, t, as_radius(r))
        ev_s.append(s)
        ev_tp.append(dtp)
        ev_fp.append(dfp)
        allscores.append(p[:, 2])
        n_truth += len(t)
    cand = np.unique(np.concatenate(allscores) if allscores else np.zeros(0))[::-1]
    if len(cand) == 0:
        raise MetricError("best_threshold needs at least one scored prediction")
    s, dtp, dfp = np.concatenate(ev_s), np.concatenate(ev_tp), np.concatenate(ev_fp)
    order = np.argsort(-s, kind="stable")
    s, ctp, cfp = s[order], np.cumsum(dtp[order]), np.cumsum(dfp[order])
    k = np.searchsorted(-s, -cand, side="right")  # events with score >= each threshold
    tp = np.where(k > 0, ctp[np.maximum(k - 1, 0)], 0)
    fp = np.where(k > 0, cfp[np.maximum(k - 1, 0)], 0)
    fn = n_truth - tp
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = tp / n_truth if n_truth else np.zeros(len(tp))
    den = 2 * tp + fp + fn
    f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    best = int(np.argmax(f1))
    curve = {"threshold": cand, "precision": precision, "recall": recall, "f1": f1,
             "tp": tp, "fp": fp, "fn": fn}
    return ThresholdResult(float(cand[best]), float(f1[best]), float(precision[best]),
                           float(recall[best]), curve)

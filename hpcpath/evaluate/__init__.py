"""Metrics for computational pathology: pure numpy/scipy functions, no cluster, no slides.

* detection: the TUPAC16 mitosis rule (points within 30 px at 0.25 um/px; one-to-one, or
  deep-histopath's ``any``), global F1, best score threshold;
* proliferation: mitoses in the densest 10 high-power fields, TUPAC16's 1-3 score, agreement
  with a slide label table (quadratic-weighted kappa, Spearman);
* roc: tie-aware ROC and AUC (agrees with scikit-learn), per-class AUC;
* froc: the CAMELYON16 lesion-level FROC and its evaluation mask;
* plots: PNGs of those curves (needs matplotlib; imported on first use).
"""

from hpcpath.evaluate._common import MetricError
from hpcpath.evaluate.detection import (
    MATCHING_RULES,
    TUPAC_MPP,
    TUPAC_RADIUS_PX,
    AnyMatch,
    DetectionScores,
    Match,
    ThresholdResult,
    best_threshold,
    f1_scores,
    match_detections,
    radius_for_mpp,
)
from hpcpath.evaluate.froc import (
    FROC_FP_RATES,
    FROCResult,
    SlideHits,
    froc,
    itc_labels,
    lesion_labels,
    score_slide,
)
from hpcpath.evaluate.plots import plot_f1_threshold, plot_froc, plot_roc
from hpcpath.evaluate.roc import PerClassAUC, per_class_auc, roc_auc, roc_curve

__all__ = [
    "MetricError",
    # detection
    "TUPAC_RADIUS_PX",
    "TUPAC_MPP",
    "MATCHING_RULES",
    "Match",
    "AnyMatch",
    "DetectionScores",
    "ThresholdResult",
    "radius_for_mpp",
    "match_detections",
    "f1_scores",
    "best_threshold",
    # roc
    "roc_curve",
    "roc_auc",
    "per_class_auc",
    "PerClassAUC",
    # froc
    "FROC_FP_RATES",
    "FROCResult",
    "SlideHits",
    "score_slide",
    "froc",
    "lesion_labels",
    "itc_labels",
    # plots
    "plot_roc",
    "plot_froc",
    "plot_f1_threshold",
]

"""CAMELYON16 lesion-level FROC: sensitivity against average false positives per slide.

The rule, as in the challenge's ``Evaluation_FROC.py``: a detection ``(x, y, prob)`` in level-0
pixels hits the lesion whose label the evaluation mask holds at ``(floor(y / ds), floor(x / ds))``.
A lesion counts once, with the highest probability among its hits; further hits on it are
neither TP nor FP.  A detection on label 0 (or outside the mask) is a false positive.  Hits on
an ignored lesion (the isolated-tumour-cell list) are neither TP nor FP, and ignored lesions
are not in the sensitivity's denominator.  The score is the mean sensitivity at 1/4, 1/2, 1, 2,
4 and 8 average FPs per slide, read from the curve by linear interpolation.

One deliberate difference: the official script drops its lowest threshold (``all_probs[1:]``)
to keep missed lesions (stored as probability 0) from counting; here a missed lesion is
simply never counted, and every threshold is kept.  Where some lesion is missed and all
probabilities are above 0, both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from hpcpath.evaluate._common import MetricError, as_points, per_image

__all__ = [
    "FROC_FP_RATES",
    "SlideHits",
    "FROCResult",
    "score_slide",
    "froc",
    "lesion_labels",
    "itc_labels",
]

FROC_FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True, eq=False)
class SlideHits:
    """One slide's outcome: FP probabilities, and per counted lesion its best hit (-inf: missed)."""

    fp_probs: np.ndarray
    lesion_ids: np.ndarray
    lesion_probs: np.ndarray


@dataclass(frozen=True, eq=False)
class FROCResult:
    """The FROC score, the sensitivity at each of ``fp_rates``, and the full curve.

    ``curve`` maps ``threshold`` (descending, starting at inf), ``fps_per_slide`` and
    ``sensitivity`` to arrays; a detection is kept when ``prob >= threshold``.
    """

    score: float
    sensitivity: np.ndarray
    fp_rates: tuple[float, ...]
    n_slides: int
    n_lesions: int
    curve: dict[str, np.ndarray] = field(repr=False)


def score_slide(detections, mask, downsample: float = 1.0, ignore: Collection[int] = ()):
    """Split one slide's detections into lesion hits and false positives.

    ``mask`` is an integer lesion-label image at ``downsample`` (0 = no lesion), or ``None`` for a
    tumour-free slide, where every detection is a false positive.
    """
    det = as_points(detections, 3, "detections")
    if mask is None:
        return SlideHits(det[:, 2].copy(), np.zeros(0, dtype=np.int64), np.zeros(0))
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise MetricError(f"mask must be a 2-D integer label image, got {mask.dtype} {mask.shape}")
    if not float(downsample) > 0:
        raise MetricError(f"downsample must be > 0, got {downsample!r}")
    ignored = np.asarray(sorted(ignore), dtype=np.int64)
    ids = np.unique(mask)
    ids = ids[(ids != 0) & ~np.isin(ids, ignored)]
    col = np.floor(det[:, 0] / downsample).astype(np.int64)
    row = np.floor(det[:, 1] / downsample).astype(np.int64)
    inside = (row >= 0) & (row < mask.shape[0]) & (col >= 0) & (col < mask.shape[1])
    hit = np.zeros(len(det), dtype=np.int64)
    hit[inside] = mask[row[inside], col[inside]]
    best = np.full(len(ids), -np.inf)
    counted = np.isin(hit, ids)
    np.maximum.at(best, np.searchsorted(ids, hit[counted]), det[counted, 2])
    return SlideHits(det[hit == 0, 2], ids.astype(np.int64), best)


def froc(
    detections: Sequence,
    masks: Sequence,
    downsample=1.0,
    ignore: Sequence[Collection[int]] | None = None,
    fp_rates: Sequence[float] = FROC_FP_RATES,
) -> FROCResult:
    """The CAMELYON16 FROC over slides: one ``(N_i, 3)`` ``x, y, prob`` array and mask per slide.

    ``downsample`` is one value or one per slide; ``ignore`` one label set per slide (ITCs).
    """
    n = len(detections)
    if n == 0 or len(masks) != n:
        raise MetricError(f"need one mask per slide and >= 1 slide; got {n} and {len(masks)}")
    downs = per_image(downsample, n, "downsample")
    ignores = [()] * n if ignore is None else per_image(list(ignore), n, "ignore")
    hits = [score_slide(d, m, ds, ig) for d, m, ds, ig in zip(detections, masks, downs, ignores)]
    fp = np.sort(np.concatenate([h.fp_probs for h in hits]))
    lesion = np.sort(np.concatenate([h.lesion_probs for h in hits]))
    if len(lesion) == 0:
        raise MetricError("no lesion to find in any mask: FROC sensitivity is undefined")
    thr = np.unique(np.concatenate([fp, lesion[np.isfinite(lesion)]]))[::-1]
    thr = np.r_[np.inf, thr]
    fps = (len(fp) - np.searchsorted(fp, thr, side="left")) / n  # count of probs >= thr
    sens = (len(lesion) - np.searchsorted(lesion, thr, side="left")) / len(lesion)
    # several thresholds can share an FP count: the curve's value there is the highest one
    xs, first = np.unique(fps, return_index=True)
    top = np.maximum.reduceat(sens, first)
    rates = tuple(float(r) for r in fp_rates)
    at = np.interp(rates, xs, top)
    curve = {"threshold": thr, "fps_per_slide": fps, "sensitivity": sens}
    return FROCResult(float(at.mean()), at, rates, n, len(lesion), curve)


def lesion_labels(binary_mask, mask_mpp: float, dilate_um: float = 75.0) -> np.ndarray:
    """The CAMELYON16 evaluation mask: lesions closer than ``dilate_um`` merged, then labelled.

    As in the challenge's ``computeEvaluationMask``: pixels nearer than ``dilate_um / 2`` to the
    tumour are added (so each lesion grows by half the distance and two lesions ``dilate_um``
    apart meet), holes are filled, and 8-connected components are numbered from 1.
    ``mask_mpp`` is the microns per pixel of the mask itself (slide MPP x downsample).
    """
    tumour = np.asarray(binary_mask).astype(bool)
    if tumour.ndim != 2:
        raise MetricError(f"binary_mask must be 2-D, got shape {tumour.shape}")
    if not float(mask_mpp) > 0:
        raise MetricError(f"mask_mpp must be > 0 microns per pixel, got {mask_mpp!r}")
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32)
    grown = ndimage.distance_transform_edt(~tumour) < dilate_um / (2.0 * float(mask_mpp))
    labels, _ = ndimage.label(ndimage.binary_fill_holes(grown), structure=np.ones((3, 3)))
    return labels.astype(np.int32)


def itc_labels(labels, mask_mpp: float, max_axis_um: float = 275.0) -> list[int]:
    """Labels too small to count (isolated tumour cells), as CAMELYON16's ``computeITCList``.

    A lesion is an ITC when the major axis of its moment ellipse (skimage's
    ``major_axis_length``) is under ``max_axis_um``: 200 um plus the 75 um the evaluation mask
    added.  Pass the result as that slide's ``ignore`` set.
    """
    labels = np.asarray(labels)
    rows, cols = np.nonzero(labels)
    lab = labels[rows, cols].astype(np.int64)
    if len(lab) == 0:
        return []
    n = np.bincount(lab).astype(np.float64)
    present = np.flatnonzero(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        my, mx = np.bincount(lab, rows) / n, np.bincount(lab, cols) / n
        dy, dx = rows - my[lab], cols - mx[lab]
        a, c = np.bincount(lab, dx * dx) / n, np.bincount(lab, dy * dy) / n
        b = np.bincount(lab, dx * dy) / n
    major = 4.0 * np.sqrt((a + c) / 2 + np.sqrt(((a - c) / 2) ** 2 + b**2))
    small = major[present] < max_axis_um / float(mask_mpp)
    return [int(i) for i in present[small]]

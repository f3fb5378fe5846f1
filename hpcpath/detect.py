"""Pure kernels of inference: test-time transforms, heatmap peaks, merging nearby hits, and
nucleus proposals.  ``F(ndarray) -> ndarray``, no Zarr, no Dask, no TensorFlow: the tasks in
``hpcpath.infer.tasks`` move the pixels and call these.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DIHEDRAL",
    "dihedral",
    "smooth_valid",
    "heatmap_peaks",
    "merge_points",
    "haematoxylin",
    "propose_nuclei",
    "densest_count",
]

DIHEDRAL = tuple(range(8))
"""The 8 symmetries of the square: k % 4 quarter turns, then a left-right flip if k >= 4."""


def dihedral(images: np.ndarray, k: int) -> np.ndarray:
    """Transform ``k`` of a (B, H, W, C) batch (a view where possible).

    Every transform maps the window centre to itself, so averaging the predictions of the
    eight (test-time augmentation) scores the same place.
    """
    out = np.rot90(images, k % 4, axes=(1, 2))
    return out[:, :, ::-1] if k >= 4 else out


def smooth_valid(values: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a grid with NaN holes (normalised convolution): holes stay NaN
    and do not drag their neighbours towards 0, so tissue edges keep their values."""
    v = np.asarray(values, np.float64)
    valid = np.isfinite(v)
    if sigma <= 0 or not valid.any():
        return np.where(valid, v, np.nan)
    from scipy import ndimage

    num = ndimage.gaussian_filter(np.where(valid, v, 0.0), sigma, mode="constant")
    den = ndimage.gaussian_filter(valid.astype(np.float64), sigma, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    return np.where(valid, out, np.nan)


def _disk(radius: float) -> np.ndarray:
    r = max(1, int(math.floor(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9


def heatmap_peaks(values: np.ndarray, threshold: float, radius_cells: float, sigma: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of a grid of probabilities: ``((K, 2) row/col, sub-cell, (K,) score)``.

    Peaks are placed on the smoothed grid (``sigma`` in cells; robust to one noisy window):
    a cell is a peak when it is the maximum of the disc of ``radius_cells`` around it, and
    its position is refined by a parabola through its neighbours along each axis (at most
    half a cell).  A peak is kept when the *unsmoothed* probability in its 3 x 3
    neighbourhood reaches ``threshold``, and that probability is its score, so the threshold
    means what the model says (a sharp single-window response survives smoothing).
    Plateaus can give adjacent peaks: merge the result with :func:`merge_points`.
    """
    from scipy import ndimage

    raw = np.asarray(values, np.float64)
    if raw.size == 0:
        return np.zeros((0, 2)), np.zeros(0)
    sm = smooth_valid(raw, sigma)
    f = np.where(np.isfinite(sm), sm, -np.inf)
    near = ndimage.maximum_filter(np.where(np.isfinite(raw), raw, -np.inf), size=3,
                                  mode="constant", cval=-np.inf)
    mx = ndimage.maximum_filter(f, footprint=_disk(max(radius_cells, 1.0)), mode="constant",
                                cval=-np.inf)
    r, c = np.nonzero((f == mx) & np.isfinite(f) & (near >= threshold))
    pos = np.stack([r, c], 1).astype(np.float64)
    h, w = f.shape
    for axis, (dr, dc) in enumerate(((1, 0), (0, 1))):
        ra, ca = np.clip(r - dr, 0, h - 1), np.clip(c - dc, 0, w - 1)
        rb, cb = np.clip(r + dr, 0, h - 1), np.clip(c + dc, 0, w - 1)
        lo, mid, hi = f[ra, ca], f[r, c], f[rb, cb]
        ok = np.isfinite(lo) & np.isfinite(hi) & ((ra != r) | (ca != c)) & ((rb != r) | (cb != c))
        den = lo - 2 * mid + hi
        with np.errstate(invalid="ignore", divide="ignore"):
            off = np.where(ok & (den < 0), 0.5 * (lo - hi) / den, 0.0)
        pos[:, axis] += np.clip(off, -0.5, 0.5)
    return pos, near[r, c].astype(np.float64)


def merge_points(xy: np.ndarray, score: np.ndarray, radius: float, method: str = "nms"
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Nearby hits as one detection each.

    ``nms``: keep the highest-scoring point, drop every point within ``radius`` of it, repeat.
    ``dbscan``: points closer than ``radius`` (chained) form one cluster (DBSCAN with
    ``min_samples=1``); each cluster becomes its score-weighted centroid with its top score.
    Ties are broken by position, so the result never depends on input order.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    score = np.asarray(score, np.float64).reshape(-1)
    if len(xy) == 0:
        return xy, score
    from scipy.spatial import cKDTree

    order = np.lexsort((xy[:, 0], xy[:, 1], -score))
    xy, score = xy[order], score[order]
    tree = cKDTree(xy)
    if method == "nms":
        keep = np.ones(len(xy), bool)
        alive = np.ones(len(xy), bool)
        for i in range(len(xy)):
            if not alive[i]:
                keep[i] = False
                continue
            for j in tree.query_ball_point(xy[i], radius):
                if j > i:
                    alive[j] = False
        return xy[keep], score[keep]
    if method == "dbscan":
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        pairs = tree.query_pairs(radius, output_type="ndarray")
        n = len(xy)
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        k, lab = connected_components(graph, directed=False)
        w = np.maximum(score, 1e-12)
        cx = np.bincount(lab, w * xy[:, 0], k) / np.bincount(lab, w, k)
        cy = np.bincount(lab, w * xy[:, 1], k) / np.bincount(lab, w, k)
        top = np.full(k, -np.inf)
        np.maximum.at(top, lab, score)
        first = np.unique(lab, return_index=True)[1]  # clusters in order of their best point
        order = np.argsort(first, kind="stable")
        return np.stack([cx, cy], 1)[order], top[order]
    raise ValueError(f"unknown merge method {method!r}; use 'nms' or 'dbscan'")


_HED_LUT: np.ndarray | None = None


def haematoxylin(rgb: np.ndarray) -> np.ndarray:
    """The haematoxylin channel of colour deconvolution, float32 (H, W).

    Equals ``skimage.color.rgb2hed(rgb)[..., 0]`` (Ruifrok & Johnston stain vectors) to
    ~1e-7, computed with a 256-entry table per channel instead of a float64 log per pixel
    (about 5x faster).
    """
    global _HED_LUT
    if _HED_LUT is None:
        from skimage.color import hed_from_rgb

        od = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
        _HED_LUT = (od[:, None] * hed_from_rgb[:, 0][None, :]).astype(np.float32)  # (256, 3)
    lut = _HED_LUT
    h = lut[rgb[..., 0], 0] + lut[rgb[..., 1], 1]
    h += lut[rgb[..., 2], 2]
    return np.maximum(h, 0, out=h)


def propose_nuclei(rgb: np.ndarray, sigma_px: float, threshold: float, min_distance_px: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Dark-nucleus candidates: ``((K, 2) row/col, (K,) strength)`` in ``rgb`` pixels.

    Colour deconvolution gives the haematoxylin density; a Gaussian of ``sigma_px`` turns
    every nucleus into one smooth blob; blob centres are the local maxima at least
    ``min_distance_px`` apart whose smoothed density is ``>= threshold``.
    """
    from scipy import ndimage
    from skimage.feature import peak_local_max

    sm = ndimage.gaussian_filter(haematoxylin(rgb), sigma_px)
    rc = peak_local_max(sm, min_distance=max(1, int(round(min_distance_px))),
                        threshold_abs=threshold, exclude_border=False)
    rc = rc[np.lexsort((rc[:, 1], rc[:, 0]))] if len(rc) else rc.reshape(0, 2)
    return rc.astype(np.int64), sm[rc[:, 0], rc[:, 1]].astype(np.float64)


def densest_count(xy: np.ndarray, side_px: float) -> int:
    """Most points in any axis-aligned, closed square of side ``side_px``, placed anywhere
    (TUPAC's "10 high-power fields" count, at 2 mm^2 per square).  Exact: some densest
    square has a point on its left and on its top edge, so for each point's x as the left
    edge the points of that vertical band are swept by y (``O(sum k log k)`` for bands of k
    points)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy) == 0 or not side_px > 0:
        return 0
    xy = xy[np.argsort(xy[:, 0], kind="stable")]
    x = xy[:, 0]
    ends = np.searchsorted(x, x + side_px * (1 + 1e-12), side="right")
    best = 1
    for i in range(len(x)):
        if i and x[i] == x[i - 1]:
            continue  # same band as the previous point
        j = ends[i]
        if j - i <= best:
            continue
        ys = np.sort(xy[i:j, 1])
        inside = np.searchsorted(ys, ys + side_px * (1 + 1e-12), side="right") - np.arange(len(ys))
        best = max(best, int(inside.max()))
    return int(best)

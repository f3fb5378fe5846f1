"""Tissue detection: pure functions from a low-resolution RGB image to a boolean mask.

Otsu's threshold on saturation (H&E tissue is coloured, glass is grey-white) or on optical
density (better for pale or faintly stained tissue), floored by a minimum so a blank slide
yields an empty mask instead of thresholding its noise.  Morphology then closes gaps, fills
holes and drops specks.  Nothing here touches a slide or a cluster, so it tests alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["tissue_mask", "tissue_channel", "threshold_channel", "tile_tissue_fraction", "Method"]

Method = Literal["saturation", "od"]

# Floors under Otsu's threshold: below these a pixel is background whatever Otsu says.
_MIN_SATURATION = 20.0  # of 255
_MIN_OD = 0.15  # clean glass reads ~0.03-0.10


_OD_SCALE = 100.0  # optical density stored as uint8 hundredths (0..2.55)


def tissue_channel(rgb: np.ndarray, method: Method = "saturation") -> np.ndarray:
    """The uint8 channel tissue is thresholded on: HSV saturation, or optical density x100.

    uint8 so that a whole-slide channel costs one byte per mask pixel: the tiling stage
    builds it block by block and never holds a full-resolution or float thumbnail.
    """
    rgb = np.asarray(rgb)
    if method == "saturation":
        mx = rgb.max(axis=-1).astype(np.uint16)
        mn = rgb.min(axis=-1).astype(np.uint16)
        s = ((mx - mn) * 255 + mx // 2) // np.maximum(mx, 1)
        return s.astype(np.uint8)
    if method == "od":
        od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0).mean(axis=-1)
        return np.clip(np.round(od * _OD_SCALE), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown tissue method {method!r}")


def threshold_channel(
    channel: np.ndarray,
    *,
    method: Method = "saturation",
    min_object_px: int = 16,
    closing_radius: int = 2,
) -> tuple[np.ndarray, float]:
    """Otsu (from the uint8 histogram) floored, then closing, hole filling, speck removal."""
    from scipy import ndimage
    from skimage import morphology

    floor = _MIN_SATURATION if method == "saturation" else _MIN_OD * _OD_SCALE
    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    threshold = max(_otsu_from_hist(hist), floor)
    mask = channel > threshold
    if closing_radius > 0 and mask.any():
        r = closing_radius  # pad so the erosion half of closing does not eat the border
        padded = np.pad(mask, r, mode="edge")
        mask = ndimage.binary_closing(padded, morphology.disk(r))[r:-r, r:-r]
    mask = ndimage.binary_fill_holes(mask)
    if min_object_px > 0 and mask.any():
        labels, n = ndimage.label(mask, output=np.int32)  # int32: half skimage's int64 labels
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes > min_object_px
        keep[0] = False
        mask = keep[labels]
        del labels
    value = threshold if method == "saturation" else threshold / _OD_SCALE
    return mask.astype(bool), float(value)


def _otsu_from_hist(hist: np.ndarray) -> float:
    """Otsu's threshold on a 256-bin histogram (pixels > t are foreground)."""
    total = hist.sum()
    if total == 0:
        return 0.0
    if np.count_nonzero(hist) < 2:
        return float(np.flatnonzero(hist)[-1])
    levels = np.arange(hist.size, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = total - w0
    m0 = np.cumsum(hist * levels)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[w1 == 0] = -1
    return float(np.argmax(between))


def tissue_mask(
    rgb: np.ndarray,
    *,
    method: Method = "saturation",
    min_object_px: int = 16,
    closing_radius: int = 2,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution RGB image, and the threshold used."""
    return threshold_channel(
        tissue_channel(rgb, method), method=method,
        min_object_px=min_object_px, closing_radius=closing_radius,
    )


def tile_tissue_fraction(
    mask: np.ndarray, boxes: np.ndarray, scale: tuple[float, float]
) -> np.ndarray:
    """Fraction of tissue under each level-0 box (x, y, w, h), from a mask at ``scale``.

    ``scale`` is (level-0 px per mask column, per mask row).  A mask pixel counts for a box
    when its centre lies inside the box; along an axis where the box covers no pixel centre
    (narrower than a mask pixel, or off the mask) the pixel under the box centre is used.  A
    summed-area table (kept only at the boxes' columns) makes this O(1) per box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    sx, sy = scale
    h, w = mask.shape
    # mask column j has centre (j + 0.5) * sx; inside [x, x + bw) <=> j in [ceil(x/sx - .5), ceil((x+bw)/sx - .5))
    x, y, bw, bh = boxes.T
    c0 = np.clip(np.ceil(x / sx - 0.5), 0, w).astype(np.int64)
    c1 = np.clip(np.ceil((x + bw) / sx - 0.5), 0, w).astype(np.int64)
    r0 = np.clip(np.ceil(y / sy - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil((y + bh) / sy - 0.5), 0, h).astype(np.int64)
    # Boxes narrower than a mask pixel: use the pixel under the box centre.
    cc = np.clip(((x + bw / 2) / sx).astype(np.int64), 0, w - 1)
    rc = np.clip(((y + bh / 2) / sy).astype(np.int64), 0, h - 1)
    c0, c1 = np.where(c1 > c0, c0, cc), np.where(c1 > c0, c1, cc + 1)
    r0, r1 = np.where(r1 > r0, r0, rc), np.where(r1 > r0, r1, rc + 1)
    # The summed-area table only at the columns the boxes start or end on: one pass of
    # row-segment sums (reduceat), then prefix sums over a (rows x columns used) table.  A
    # full table's prefix sum down the rows costs ~10x more on a 2048^2 label raster.
    # int32 counts (never more than the mask's pixel count, < 2**31).
    dt = np.int32 if h * w < 2**31 else np.int64
    cuts = np.unique(np.concatenate([[0], c0, c1]))          # sorted, in [0, w]
    starts = cuts[cuts < w]
    m = mask.view(np.uint8) if mask.dtype == bool else mask
    seg = np.add.reduceat(m, starts, axis=1, dtype=dt) if w else np.zeros((h, 0), dt)
    sat = np.zeros((h + 1, len(starts) + 1), dt)             # sat[r, k]: mask[:r, :edge k]
    np.cumsum(seg, axis=1, out=sat[1:, 1:])
    np.cumsum(sat[1:], axis=0, out=sat[1:])
    edges = np.append(starts, w)
    k0, k1 = np.searchsorted(edges, c0), np.searchsorted(edges, c1)
    total = sat[r1, k1] - sat[r0, k1] - sat[r1, k0] + sat[r0, k0]
    area = (r1 - r0) * (c1 - c0)
    return (total / np.maximum(area, 1)).astype(np.float32)

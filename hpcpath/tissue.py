"""Tissue detection: pure functions from a low-resolution RGB image to a boolean mask.

Otsu's threshold on saturation (H&E tissue is coloured, glass is grey-white) or on optical
density (better for pale or faintly stained tissue), floored by a minimum so a blank slide
yields an empty mask instead of thresholding its noise.  Morphology then closes gaps, fills
holes and drops specks.  Nothing here touches a slide or a cluster, so it tests alone.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["tissue_mask", "tile_tissue_fraction", "Method"]

Method = Literal["saturation", "od"]

# Floors under Otsu's threshold: below these a pixel is background whatever Otsu says.
_MIN_SATURATION = 20.0  # of 255
_MIN_OD = 0.15  # clean glass reads ~0.03-0.10


def _saturation(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    mx = rgb.max(axis=-1)
    mn = rgb.min(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(mx > 0, (mx - mn) / mx, 0.0)
    return s * 255.0


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    od = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return od.mean(axis=-1)


def tissue_mask(
    rgb: np.ndarray,
    *,
    method: Method = "saturation",
    min_object_px: int = 16,
    closing_radius: int = 2,
) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a low-resolution RGB image, and the threshold used."""
    from skimage import filters, morphology
    from scipy import ndimage

    if method == "saturation":
        channel, floor = _saturation(rgb), _MIN_SATURATION
    elif method == "od":
        channel, floor = _optical_density(rgb), _MIN_OD
    else:
        raise ValueError(f"unknown tissue method {method!r}")
    if float(channel.max()) - float(channel.min()) < 1e-6:
        threshold = float(channel.max())
    else:
        threshold = float(filters.threshold_otsu(channel))
    threshold = max(threshold, floor)
    mask = channel > threshold
    if closing_radius > 0 and mask.any():
        r = closing_radius  # pad so the erosion half of closing does not eat the border
        padded = np.pad(mask, r, mode="edge")
        mask = ndimage.binary_closing(padded, morphology.disk(r))[r:-r, r:-r]
    mask = ndimage.binary_fill_holes(mask)
    if min_object_px > 0 and mask.any():
        mask = morphology.remove_small_objects(mask, max_size=min_object_px)
    return mask.astype(bool), threshold


def tile_tissue_fraction(
    mask: np.ndarray, boxes: np.ndarray, scale: tuple[float, float]
) -> np.ndarray:
    """Fraction of tissue under each level-0 box (x, y, w, h), from a mask at ``scale``.

    ``scale`` is (level-0 px per mask column, per mask row).  A mask pixel counts for a box
    when its centre lies inside the box; along an axis where the box covers no pixel centre
    (narrower than a mask pixel, or off the mask) the pixel under the box centre is used.  Summed-area tables make this O(1) per box.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    sx, sy = scale
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
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
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    area = (r1 - r0) * (c1 - c0)
    return (total / np.maximum(area, 1)).astype(np.float32)

"""Tissue detection: pure functions from a low-resolution RGB image to a boolean mask.

Otsu's threshold on saturation (H&E tissue is coloured, glass is grey-white) or on optical
density (better for pale or faintly stained tissue), floored by a minimum so a blank slide
yields an empty mask instead of thresholding its noise.  Morphology then closes gaps, fills
holes and drops specks.  Nothing here touches a slide or a cluster, so it tests alone.

Two forms of the same computation: :func:`threshold_channel` on a whole channel in memory,
and :func:`threshold_blocked`, block by block through two caller-given 2-D arrays (numpy,
or Zarr on disk), whose memory is a few blocks whatever the slide size and whose result is
identical, pixel for pixel (halos for closing and speck removal; holes joined across block
borders).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np

__all__ = ["tissue_mask", "tissue_channel", "threshold_channel", "threshold_blocked",
           "tile_tissue_fraction", "box_pixels", "Method"]

Method = Literal["saturation", "od"]

# Floors under Otsu's threshold: below these a pixel is background whatever Otsu says.
_MIN_SATURATION = 20.0  # of 255
_MIN_OD = 0.15  # clean glass reads ~0.03-0.10


_OD_SCALE = 100.0  # optical density stored as uint8 hundredths (0..2.55)


def _saturation_table() -> np.ndarray:
    """HSV saturation (uint8, rounded) of every (max, min) pair, at index max * 256 + min."""
    mx = np.arange(256, dtype=np.int64)[:, None]
    mn = np.minimum(np.arange(256, dtype=np.int64)[None, :], mx)  # (min > max never occurs)
    return (((mx - mn) * 255 + mx // 2) // np.maximum(mx, 1)).astype(np.uint8).ravel()


_SATURATION = _saturation_table()


def tissue_channel(rgb: np.ndarray, method: Method = "saturation") -> np.ndarray:
    """The uint8 channel tissue is thresholded on: HSV saturation, or optical density x100.

    uint8 so that a whole-slide channel costs one byte per mask pixel: the tiling stage
    builds it block by block and never holds a full-resolution or float thumbnail.
    """
    rgb = np.asarray(rgb)
    if method == "saturation":  # ((max - min) * 255 + max // 2) // max, from a table: ~20x faster
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        at = np.maximum(np.maximum(r, g), b).astype(np.uint16)
        at <<= 8
        at |= np.minimum(np.minimum(r, g), b)
        return _SATURATION.take(at)
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

    hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
    threshold, value = _threshold(hist, method)
    mask = channel > threshold
    if closing_radius > 0 and mask.any():
        r = closing_radius  # pad so the erosion half of closing does not eat the border
        padded = np.pad(mask, r, mode="edge")
        mask = ndimage.binary_closing(padded, disk(r))[r:-r, r:-r]
    mask = ndimage.binary_fill_holes(mask)
    if min_object_px > 0 and mask.any():
        labels, n = ndimage.label(mask, output=np.int32)  # int32: half skimage's int64 labels
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes > min_object_px
        keep[0] = False
        mask = keep[labels]
        del labels
    return mask.astype(bool), value


def disk(r: int) -> np.ndarray:
    """The closing's structuring element: ``skimage.morphology.disk(r)`` (uint8, pixels with
    x^2 + y^2 <= r^2), computed here so the tissue test does not import scikit-image (~0.1 s
    of a one-slide run's start-up).

    >>> disk(1).tolist()
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    """
    d = np.arange(-r, r + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2 <= r * r).astype(np.uint8)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph on ``n`` nodes with edges ``a[i] - b[i]``:
    each node's smallest node id in its component (minimum-label propagation with pointer
    jumping, in numpy; scipy.sparse.csgraph would cost ~60 ms of imports per run).

    >>> components(6, np.array([0, 3, 4]), np.array([2, 4, 5])).tolist()
    [0, 1, 0, 3, 3, 3]
    """
    comp = np.arange(n, dtype=np.int64)
    if not len(a):
        return comp
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while True:
        low = np.minimum(comp[a], comp[b])
        new = comp.copy()
        np.minimum.at(new, comp[a], low)  # hook each root onto the smaller root it meets
        np.minimum.at(new, comp[b], low)
        while True:  # pointer jumping: every node straight to its root
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, comp):
            return comp
        comp = new


def _threshold(hist: np.ndarray, method: Method) -> tuple[float, float]:
    """(threshold on the uint8 channel, the same in the method's units) from a histogram."""
    floor = _MIN_SATURATION if method == "saturation" else _MIN_OD * _OD_SCALE
    threshold = max(_otsu_from_hist(hist), floor)
    return threshold, float(threshold if method == "saturation" else threshold / _OD_SCALE)


def _blocks(shape: tuple[int, int], block: int):
    h, w = shape
    for r0 in range(0, h, block):
        for c0 in range(0, w, block):
            yield r0, min(r0 + block, h), c0, min(c0 + block, w)


def _window(r0: int, r1: int, c0: int, c1: int, halo: int, shape: tuple[int, int]):
    """The block grown by ``halo`` on every side, clipped to the image."""
    return max(0, r0 - halo), min(shape[0], r1 + halo), max(0, c0 - halo), min(shape[1], c1 + halo)


def threshold_blocked(
    read_channel: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    scratch: Any,
    out: Any,
    *,
    method: Method = "saturation",
    min_object_px: int = 16,
    closing_radius: int = 2,
    block: int = 1024,
) -> float:
    """:func:`threshold_channel` block by block; the mask (uint8 0/1) lands in ``out``.

    ``read_channel(row, col, h, w)`` gives the uint8 channel of one block; ``scratch`` and
    ``out`` are (h, w) uint8 arrays that take 2-D slice reads and writes (numpy, or Zarr
    with ``block``-sized chunks so that every write is whole chunks).  Memory is a few
    blocks, not the image.  Four passes, each block read with what it needs around it:

    1. the channel into ``scratch``, summing the 256-bin histogram (all Otsu needs);
    2. threshold and closing with a halo of ``2 * closing_radius`` (the image's own edges
       padded as the whole-image form pads them) -> ``out``; the background of each block
       labelled (4-connected) and the labels on its edges kept;
    3. hole filling: background components joined across block edges
       (``scipy.sparse.csgraph``); those that reach the image's edge stay background,
       every other background pixel is a hole -> ``scratch``;
    4. speck removal with a halo of ``min_object_px`` (a 4-connected object that leaves
       that window has more pixels than the halo is wide) -> ``out``.

    Returns the threshold (as :func:`threshold_channel` does); the result equals
    ``threshold_channel`` on the whole channel exactly.
    """
    from scipy import ndimage

    h, w = shape
    blocks = list(_blocks(shape, block))
    hist = np.zeros(256, np.int64)
    for r0, r1, c0, c1 in blocks:  # 1: channel and histogram
        ch = np.asarray(read_channel(r0, c0, r1 - r0, c1 - c0), np.uint8)
        hist += np.bincount(ch.ravel(), minlength=256)
        scratch[r0:r1, c0:c1] = ch
    threshold, value = _threshold(hist.astype(np.float64), method)
    any_tissue = bool(hist[int(threshold) + 1:].sum())
    r = closing_radius if any_tissue else 0
    se = disk(r) if r > 0 else None

    # 2: threshold + closing; background labels on each block's four edges
    edges: dict[tuple[int, int], tuple[np.ndarray, ...]] = {}
    border_labels: dict[tuple[int, int], np.ndarray] = {}
    n_ids = 0
    for r0, r1, c0, c1 in blocks:
        wr0, wr1, wc0, wc1 = _window(r0, r1, c0, c1, 2 * r, shape)
        m = np.asarray(scratch[wr0:wr1, wc0:wc1]) > threshold
        blank = not m.any()  # most blocks of a slide: no closing, one background component
        if blank:
            m = np.zeros((r1 - r0, c1 - c0), bool)
        elif se is not None:
            pad = ((r * (wr0 == 0), r * (wr1 == h)), (r * (wc0 == 0), r * (wc1 == w)))
            m = ndimage.binary_closing(np.pad(m, pad, mode="edge"), se)
            m = m[r0 - wr0 + pad[0][0]:, c0 - wc0 + pad[1][0]:][: r1 - r0, : c1 - c0]
        else:
            m = m[r0 - wr0 :, c0 - wc0 :][: r1 - r0, : c1 - c0]
        out[r0:r1, c0:c1] = m.view(np.uint8)
        labels = np.ones(m.shape, np.int32) if blank else ndimage.label(~m, output=np.int32)[0]
        rim = (labels[0], labels[-1], labels[:, 0], labels[:, -1])  # top, bottom, left, right
        used = np.unique(np.concatenate(rim))
        used = used[used > 0]
        border_labels[r0, c0] = used
        # label -> id over all blocks (-1: foreground); only labels on an edge need one
        lut = np.full(int(used[-1]) + 1 if len(used) else 1, -1, np.int64)
        lut[used] = n_ids + np.arange(len(used))
        n_ids += len(used)
        edges[r0, c0] = tuple(lut[e] for e in rim)

    # 3: which background components reach the image's edge, then fill the others
    a_ids, b_ids, outside = [], [], []
    for r0, r1, c0, c1 in blocks:
        top, bottom, left, right = edges[r0, c0]
        if (r0, c1) in edges:  # right neighbour: our right column against its left
            a_ids += [right]
            b_ids += [edges[r0, c1][2]]
        if (r1, c0) in edges:  # the block below: our bottom row against its top
            a_ids += [bottom]
            b_ids += [edges[r1, c0][0]]
        outside += [e for e, at_edge in ((top, r0 == 0), (bottom, r1 == h), (left, c0 == 0),
                                         (right, c1 == w)) if at_edge]
    a = np.concatenate(a_ids) if a_ids else np.zeros(0, np.int64)
    b = np.concatenate(b_ids) if b_ids else np.zeros(0, np.int64)
    both = (a >= 0) & (b >= 0)
    comp = components(n_ids, a[both], b[both])
    open_comp = np.zeros(int(comp.max()) + 1 if n_ids else 1, bool)
    if outside:
        o = np.concatenate(outside)
        open_comp[comp[o[o >= 0]]] = True
    for r0, r1, c0, c1 in blocks:
        m = np.asarray(out[r0:r1, c0:c1]).astype(bool)
        if m.any():
            labels, n = ndimage.label(~m, output=np.int32)
        else:
            labels, n = np.ones(m.shape, np.int32), 1
        used = border_labels[r0, c0]
        background = np.zeros(n + 1, bool)  # label -> stays background (reaches the edge)
        if len(used):
            ids = edges[r0, c0]
            lut = np.full(int(used[-1]) + 1, -1, np.int64)
            for rim, e in zip((labels[0], labels[-1], labels[:, 0], labels[:, -1]), ids):
                lut[rim] = e
            background[used] = open_comp[comp[lut[used]]]
        scratch[r0:r1, c0:c1] = (~background[labels]).view(np.uint8)

    # 4: speck removal, each block with a halo of min_object_px
    for r0, r1, c0, c1 in blocks:
        if not (min_object_px > 0 and any_tissue):
            out[r0:r1, c0:c1] = scratch[r0:r1, c0:c1]
            continue
        wr0, wr1, wc0, wc1 = _window(r0, r1, c0, c1, min_object_px, shape)
        m = np.asarray(scratch[wr0:wr1, wc0:wc1]).astype(bool)
        if not m.any():
            out[r0:r1, c0:c1] = np.zeros((r1 - r0, c1 - c0), np.uint8)
            continue
        labels, n = ndimage.label(m, output=np.int32)
        keep = np.bincount(labels.ravel(), minlength=n + 1) > min_object_px
        keep[0] = False
        out[r0:r1, c0:c1] = keep[labels[r0 - wr0 : r1 - wr0, c0 - wc0 : c1 - wc0]].view(np.uint8)
    return value


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
    mask: np.ndarray, boxes: np.ndarray, scale: tuple[float, float], *,
    window: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Fraction of tissue under each level-0 box (x, y, w, h), from a mask at ``scale``.

    ``scale`` is (level-0 px per mask column, per mask row).  A mask pixel counts for a box
    when its centre lies inside the box; along an axis where the box covers no pixel centre
    (narrower than a mask pixel, or off the mask) the pixel under the box centre is used.  A
    summed-area table (kept only at the boxes' columns) makes this O(1) per box.

    ``window=(row, col, height, width)``: ``mask`` is the part at (row, col) of a mask of
    (height, width) -- the same answer as from the whole mask, for boxes whose pixels lie in
    the part (:func:`box_pixels` says which); a ValueError otherwise.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, np.float32)
    row, col, h, w = window or (0, 0, *mask.shape)
    r0, r1, c0, c1 = box_pixels(boxes, scale, (h, w))
    if row or col or (h, w) != mask.shape:
        r0, r1, c0, c1 = r0 - row, r1 - row, c0 - col, c1 - col
        if len(r0) and (min(r0.min(), c0.min()) < 0 or r1.max() > mask.shape[0] or c1.max() > mask.shape[1]):
            raise ValueError("a box reaches outside the mask window")
    return _box_means(mask, r0, r1, c0, c1)


def box_pixels(boxes: np.ndarray, scale: tuple[float, float], shape: tuple[int, int]):
    """Mask rows [r0, r1) and columns [c0, c1) each level-0 box counts (see
    :func:`tile_tissue_fraction`), in a mask of ``shape``."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = scale
    h, w = shape
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
    return r0, r1, c0, c1


def _box_means(mask: np.ndarray, r0, r1, c0, c1) -> np.ndarray:
    h, w = mask.shape
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

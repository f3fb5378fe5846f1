"""Tissue detection and per-tile tissue fractions: pure functions, no slide, no cluster."""

from __future__ import annotations

import numpy as np
import pytest

from hpcpath.tissue import tile_tissue_fraction, tissue_mask


def _he_like(shape=(200, 300), seed=0):
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(238, 3, (*shape, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = (yy - 100) ** 2 / 60**2 + (xx - 120) ** 2 / 80**2 < 1
    img[blob] = np.clip(rng.normal((215, 140, 185), 12, (blob.sum(), 3)), 0, 255).astype(np.uint8)
    return img, blob


@pytest.mark.parametrize("method", ["saturation", "od"])
def test_finds_the_tissue_blob(method):
    img, blob = _he_like()
    mask, threshold = tissue_mask(img, method=method)
    assert threshold > 0
    iou = (mask & blob).sum() / (mask | blob).sum()
    assert iou > 0.95


@pytest.mark.parametrize("method", ["saturation", "od"])
def test_blank_glass_has_no_tissue(method):
    rng = np.random.default_rng(1)
    img = np.clip(rng.normal(240, 4, (120, 160, 3)), 0, 255).astype(np.uint8)
    mask, _ = tissue_mask(img, method=method)
    assert not mask.any()


def test_holes_filled_and_specks_removed():
    img = np.full((100, 100, 3), 240, np.uint8)
    img[20:80, 20:80] = (200, 100, 160)
    img[45:55, 45:55] = 240  # a hole inside tissue
    img[5:7, 90:92] = (200, 100, 160)  # a 4-pixel speck
    mask, _ = tissue_mask(img)
    assert mask[50, 50] and not mask[6, 91]


def test_tile_fraction_matches_brute_force():
    rng = np.random.default_rng(2)
    mask = rng.random((37, 53)) > 0.6
    scale = (8.0, 8.0)
    boxes = []
    for _ in range(300):
        w = float(rng.integers(4, 120))
        boxes.append([rng.uniform(-20, 53 * 8), rng.uniform(-20, 37 * 8), w, w])
    boxes = np.array(boxes)
    got = tile_tissue_fraction(mask, boxes, scale)
    centres = lambda n: (np.arange(n) + 0.5) * 8.0  # noqa: E731
    for (x, y, w, h), g in zip(boxes, got):
        cols = np.flatnonzero((centres(53) >= x) & (centres(53) < x + w))
        rows = np.flatnonzero((centres(37) >= y) & (centres(37) < y + h))
        # an axis with no pixel centre inside falls back to the pixel under the box centre
        if cols.size == 0:
            cols = [min(max(int((x + w / 2) / 8), 0), 52)]
        if rows.size == 0:
            rows = [min(max(int((y + h / 2) / 8), 0), 36)]
        assert g == pytest.approx(mask[np.ix_(rows, cols)].mean(), abs=1e-6)


def test_saturation_channel_is_hsv_saturation_rounded():
    """tissue_channel("saturation") (a table lookup) is round(255 * (max - min) / max) with
    halves up, for every (max, min) pair a pixel can have, in any channel order."""
    from hpcpath.tissue import tissue_channel

    mx, mn = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    ok = mn <= mx
    mx, mn = mx[ok], mn[ok]
    mid = (mx + mn) // 2
    rgb = np.stack([mn, mx, mid], -1).astype(np.uint8)[None]  # max in green, min in red
    want = np.floor(255 * (mx - mn) / np.maximum(mx, 1) + 0.5).astype(np.uint8)
    for order in ([0, 1, 2], [1, 2, 0], [2, 0, 1]):
        assert np.array_equal(tissue_channel(rgb[..., order])[0], want)

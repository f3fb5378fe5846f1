"""The pure parts of inference: window grid, task blocks, peaks, merging, proposals, batching,
read-ahead.  No cluster, no model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hpcpath.config import TileConfig
from hpcpath.detect import (
    densest_count,
    dihedral,
    haematoxylin,
    heatmap_peaks,
    merge_points,
    propose_nuclei,
    smooth_valid,
)
from hpcpath.grid import task_blocks, tissue_windows, window_grid
from hpcpath.infer.reader import Prefetcher, cut_patches, point_blocks, rebatch


def test_window_grid_matches_the_tile_grid():
    from hpcpath.io.slide import SlideInfo
    from hpcpath.tiling import tile_geometry, tile_grid

    info = SlideInfo("s", "s.svs", 1, "aperio", ((5000, 3000), (1250, 750)), (1.0, 4.0),
                     (0.5, 0.5), "header", 20.0)
    for cfg in (TileConfig(tile_size=256), TileConfig(tile_size=256, overlap=64), TileConfig(tile_size=128, level=1)):
        geom = tile_geometry(info, cfg)
        index, _ = tile_grid(geom)
        g = window_grid(info.dimensions, cfg.tile_size, geom.downsample, cfg.stride)
        assert (g.rows, g.cols) == (index[:, 3].max() + 1, index[:, 4].max() + 1)
        np.testing.assert_allclose(g.origins(index[:, 3:5]), index[:, :2])
    g = window_grid((1000, 1000), 64, 1.0, 16)
    rc = np.array([[0, 0], [3, 5], [g.rows - 1, g.cols - 1]])
    np.testing.assert_array_equal(g.cell_of(g.centres(rc)), rc)
    np.testing.assert_array_equal(g.cell_of(g.centres(rc) + 7.9), rc)


def test_tissue_windows_follow_the_mask():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:8] = True  # mask pixel = 100 level-0 px
    g = window_grid((1000, 1000), 100, 1.0, 100)
    rc, frac = tissue_windows(g, mask, (100, 100), 0.5)
    assert {tuple(x) for x in rc} == {(r, c) for r in range(2, 6) for c in range(3, 8)}
    assert (frac == 1).all()
    rc2, _ = tissue_windows(g, mask, (100, 100), 0.0, box_side=300)  # cells of 3 windows
    assert len(rc2) > len(rc)


def test_task_blocks_cover_every_window_once_in_whole_chunks():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.integers(0, 97, 5000))
    blocks = task_blocks(rows, 97, 4, 700)
    covered = np.zeros(97, int)
    for a, b in blocks:
        assert a % 4 == 0 and (b % 4 == 0 or b == 97) and b > a
        covered[a:b] += 1
    assert covered.max() == 1
    assert covered[np.unique(rows)].min() == 1
    sizes = [((rows >= a) & (rows < b)).sum() for a, b in blocks]
    assert sum(sizes) == len(rows) and max(sizes) < 700 + 4 * 80
    assert task_blocks(np.zeros(0, int), 10, 2, 5) == []


def test_heatmap_peaks_find_subcell_centres_and_respect_the_threshold():
    yy, xx = np.mgrid[:40, :50]
    heat = np.exp(-((yy - 12.3) ** 2 + (xx - 30.6) ** 2) / 4.0) * 0.9
    heat += np.exp(-((yy - 30) ** 2 + (xx - 10) ** 2) / 4.0) * 0.3  # below threshold
    heat[0:3, :] = np.nan
    pos, score = heatmap_peaks(heat, 0.5, 3, sigma=1.0)
    assert len(pos) == 1 and abs(pos[0, 0] - 12.3) < 0.2 and abs(pos[0, 1] - 30.6) < 0.2
    assert score[0] == pytest.approx(heat[12, 31])
    # one sharp window among zeros survives smoothing: the score is the model's own value
    spike = np.zeros((20, 20))
    spike[7, 9] = 0.97
    pos, score = heatmap_peaks(spike, 0.5, 2, sigma=1.0)
    assert pos.round().tolist() == [[7, 9]] and score.tolist() == [0.97]
    sm = smooth_valid(np.where(np.arange(10) < 5, 1.0, np.nan)[None].repeat(3, 0), 2.0)
    assert np.allclose(sm[:, :5], 1.0) and np.isnan(sm[:, 5:]).all()  # holes do not drag edges


@pytest.mark.parametrize("method", ["nms", "dbscan"])
def test_merge_points_is_order_independent(method):
    rng = np.random.default_rng(1)
    centres = np.array([[100, 100], [300, 100], [100, 400]], float)
    xy = np.concatenate([c + rng.normal(0, 5, (6, 2)) for c in centres])
    score = rng.uniform(0.5, 1, len(xy))
    a = merge_points(xy, score, 32, method)
    perm = rng.permutation(len(xy))
    b = merge_points(xy[perm], score[perm], 32, method)
    assert len(a[0]) == 3
    np.testing.assert_allclose(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1])
    assert sorted(a[1]) == sorted(score.reshape(3, 6).max(1))
    with pytest.raises(ValueError):
        merge_points(xy, score, 32, "kmeans")


def test_haematoxylin_equals_rgb2hed_and_proposals_find_dark_blobs():
    from skimage.color import rgb2hed

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    np.testing.assert_allclose(haematoxylin(rgb), rgb2hed(rgb)[..., 0], atol=1e-6)
    img = np.full((200, 300, 3), (230, 200, 220), np.uint8)
    yy, xx = np.mgrid[:200, :300]
    blobs = [(50, 60), (120, 200), (160, 40)]
    for r, c in blobs:
        img[(yy - r) ** 2 + (xx - c) ** 2 <= 36] = (60, 30, 120)
    rc, strength = propose_nuclei(img, 2.0, 0.05, 8)
    assert sorted(map(tuple, rc.tolist())) == sorted(blobs) and (strength > 0.05).all()


def test_dihedral_gives_the_eight_symmetries():
    x = np.arange(2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
    outs = {dihedral(x, k).tobytes() for k in range(8)}
    assert len(outs) == 8
    assert np.array_equal(dihedral(dihedral(x, 1), 3), x)


def test_rebatch_and_cut_patches():
    pieces = [(np.arange(a, b), {"main": np.arange(a, b)[:, None] * np.ones((1, 3))})
              for a, b in ((0, 5), (5, 6), (6, 20), (20, 20), (20, 23))]
    out = list(rebatch(iter(pieces), 4))
    assert [len(k) for k, _ in out] == [4, 4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate([k for k, _ in out]), np.arange(23))
    np.testing.assert_array_equal(np.concatenate([a["main"][:, 0] for _, a in out]), np.arange(23))
    img = np.random.default_rng(3).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    off = np.array([[0, 0], [10, 17], [34, 44]])
    patches = cut_patches(img, off, 16)
    for p, (r, c) in zip(patches, off):
        np.testing.assert_array_equal(p, img[r:r + 16, c:c + 16])
    with pytest.raises(ValueError):
        cut_patches(img, [[40, 50]], 16)
    blocks = list(point_blocks(np.array([[5, 5], [300, 5], [6, 7], [5, 300]]), 100))
    assert [b.tolist() for b in blocks] == [[0, 2], [1], [3]]


def test_prefetcher_reads_ahead_and_hands_errors_over():
    produced = []

    def make():
        for i in range(5):
            produced.append(i)
            yield i

    with Prefetcher(make, depth=2) as pf:
        it = iter(pf)
        assert next(it) == 0
        time.sleep(0.2)
        assert len(produced) >= 3  # ahead of the consumer
        assert list(it) == [1, 2, 3, 4]

    def bad():
        yield 1
        raise KeyError("boom")

    with Prefetcher(bad, depth=1) as pf:
        with pytest.raises(KeyError):
            list(pf)
    before = threading.active_count()
    with Prefetcher(lambda: iter(range(10**9)), depth=2) as pf:
        next(iter(pf))  # consumer leaves early: the producer stops
    time.sleep(0.3)
    assert threading.active_count() <= before


def test_densest_count_matches_a_brute_force():
    """Exact over every placement: a densest closed square can be moved until a point lies
    on its left edge and one on its top edge, so trying every (x_i, y_j) corner is a full
    search (independent of the band sweep the kernel uses)."""
    rng = np.random.default_rng(4)
    for n, side in ((200, 200.0), (60, 90.0), (300, 50.0)):
        xy = rng.uniform(0, 1000, (n, 2))
        xy[:5] = np.round(xy[:5])  # a few on integer coordinates, exactly side apart below
        xy[5] = xy[4] + side  # closed square: both ends count
        best = 0
        for x0 in xy[:, 0]:
            band = xy[(xy[:, 0] >= x0) & (xy[:, 0] <= x0 + side)]
            for y0 in band[:, 1]:
                best = max(best, int(((band[:, 1] >= y0) & (band[:, 1] <= y0 + side)).sum()))
        assert densest_count(xy, side) == best
        lattice = 0  # the old half-side lattice search can only find less
        for x0 in np.arange(-side, 1000, side / 2):
            for y0 in np.arange(-side, 1000, side / 2):
                inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + side) & (xy[:, 1] >= y0)
                          & (xy[:, 1] < y0 + side))
                lattice = max(lattice, int(inside.sum()))
        assert best >= lattice
    assert densest_count(np.zeros((0, 2)), side) == 0
    assert densest_count(np.array([[5.0, 5.0], [5.0, 5.0]]), 1.0) == 2

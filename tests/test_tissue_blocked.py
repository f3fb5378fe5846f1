"""Blockwise tissue detection (``threshold_blocked``) equals the whole-image form
(``threshold_channel``) pixel for pixel: on real slides, on masks built to straddle block
borders, and through the planning task that writes the store's mask and tile fractions."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from hpcpath.io import open_slide
from hpcpath.tissue import threshold_blocked, threshold_channel, tile_tissue_fraction, tissue_channel


def _blocked(channel, block, scratch=None, out=None, **kw):
    h, w = channel.shape
    scratch = np.full((h, w), 77, np.uint8) if scratch is None else scratch  # garbage in
    out = np.full((h, w), 77, np.uint8) if out is None else out
    value = threshold_blocked(lambda r, c, bh, bw: channel[r : r + bh, c : c + bw], (h, w),
                              scratch, out, block=block, **kw)
    return np.asarray(out[:]).astype(bool), value


def _same(channel, block, **kw):
    ref, ref_value = threshold_channel(channel, **kw)
    got, value = _blocked(channel, block, **kw)
    assert value == ref_value
    assert np.array_equal(got, ref), f"{int((got != ref).sum())} pixels differ (block {block}, {kw})"
    return ref


@pytest.mark.parametrize("name", ["cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs",
                                  "test3-TRITC 2 (560).ndpi"])
@pytest.mark.parametrize("method", ["saturation", "od"])
def test_equals_whole_image_on_real_slides(test_data, name, method):
    with open_slide(test_data / "slides" / name) as s:
        w0, h0 = s.info.dimensions
        ds = max(w0, h0) / 600  # ~600 px on the long side: ~100 blocks of 64
        channel = tissue_channel(s.read_scaled(0, 0, int(w0 / ds), int(h0 / ds), ds), method)
    ref = _same(channel, 64, method=method)
    _same(channel, 41, method=method, closing_radius=3, min_object_px=40)
    # the morphology did something, so equality is not trivially "threshold only" (the
    # fluorescence slide is dark everywhere: all tissue by optical density)
    thr, _ = threshold_channel(channel, method=method, closing_radius=0, min_object_px=0)
    assert ref.any() and ((ref != thr).any() or "TRITC" in name)


def test_equals_whole_image_through_zarr_arrays(test_data, tmp_path):
    from hpcpath.store import mask_scratch

    with open_slide(test_data / "slides" / "cmu-1-small-region.svs") as s:
        channel = tissue_channel(s.read_scaled(0, 0, 555, 742, 4.0))
    ref, _ = threshold_channel(channel)
    got, _ = _blocked(channel, 1024 // 8, mask_scratch(tmp_path, "a", channel.shape),
                      mask_scratch(tmp_path, "b", channel.shape))
    assert np.array_equal(got, ref)


def test_scratch_keeps_only_a_window_resident(tmp_path):
    """A MaskScratch's pages leave the process after each access (they stay in its file):
    writing and reading back a 64 MB array by 1024-px blocks adds a few blocks to RSS, not
    the array; and what was written reads back."""
    from hpcpath.store import mask_scratch

    def rss_file_kb() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("RssFile:")))

    n, b = 8192, 1024
    arr = mask_scratch(tmp_path, "m", (n, n))
    before = rss_file_kb()
    for r in range(0, n, b):
        for c in range(0, n, b):
            arr[r : r + b, c : c + b] = (r // b + c // b) % 251
    for r in range(0, n, b):
        for c in range(0, n, b):
            assert int(arr[r : r + b + 3, c : c + b + 3][5, 5]) == (r // b + c // b) % 251
    assert rss_file_kb() - before < 16 * 1024, "the scratch's pages stayed in the process"
    arr.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_scratch_on_a_full_disk_is_an_oserror_not_a_sigbus(tmp_path):
    """The scratch takes its disk when it is made: on a full disk that is ENOSPC (the slide
    fails in one line), never a write through the mapping into a file that cannot grow."""
    import errno
    import subprocess

    from hpcpath.store import mask_scratch

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(OSError) as err:
            mask_scratch(mnt, "m", (4096, 4096))
        assert err.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _disk(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_structures_that_straddle_block_borders():
    """Block 16: a ring whose hole spans four blocks is filled; a hole opened to the slide's
    edge (the hole spans six blocks, the opening lies in another) stays open; a hole bigger than a block is
    filled; a speck of exactly min_object_px pixels on a block corner goes, one pixel more
    stays (also a 10-px line whose block sees only 1 px of it: a halo of 8 would miss it);
    a 3-px gap across a block border is closed."""
    h, w = 96, 112
    tissue = np.zeros((h, w), bool)
    tissue |= _disk((h, w), 32, 32, 14) & ~_disk((h, w), 32, 32, 6)        # ring on corner (32, 32)
    tissue[50:94, 52:110] = True                                            # a slab ...
    tissue[58:86, 60:102] = False                                           # ... around a 28x42 hole
    open_ring = np.zeros((h, w), bool)
    open_ring[2:30, 60:100] = True
    open_ring[6:26, 64:96] = False                                          # hole at rows 6-25 ...
    open_ring[0:12, 77:83] = False                                          # ... opened to row 0
    tissue |= open_ring
    tissue[47:49, 14:18] = True                                             # 8 px on corner (48, 16)
    tissue[62:65, 14:17] = True                                             # 9 px on border row 64
    tissue[64, 17] = True                                                   # (10 px)
    tissue[4, 15:25] = True                                                 # 10 px line from column 15
    tissue[80:90, 2:15] = True                                              # two slabs 3 px apart ...
    tissue[80:90, 18:30] = True                                             # ... across column 16
    rng = np.random.default_rng(3)
    channel = np.where(tissue, 150, 5).astype(np.uint8) + rng.integers(0, 4, (h, w)).astype(np.uint8)

    for block in (16, 13):
        ref = _same(channel, block, min_object_px=9, closing_radius=2)
        assert ref[32, 32]                  # ring's hole filled
        assert ref[70, 80]                  # big hole filled
        assert not ref[15, 80]              # hole open to the edge stays background
        assert not ref[48, 16]              # 8 px speck removed (<= 9)
        assert ref[63, 15]                  # 10 px object kept
        assert ref[4, 15]                   # a line reaching 9 px past a border: kept
        assert ref[85, 16]                  # gap closed
    _same(channel, 16, min_object_px=9, closing_radius=3)
    _same(channel, 7, min_object_px=30, closing_radius=1)


@pytest.mark.parametrize("seed", range(6))
def test_random_blobs_many_blocks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(40, 140, 2)
    channel = np.clip(rng.normal(10, 5, (h, w)), 0, 255).astype(np.uint8)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(rng.integers(3, 12)):  # blobs, and blobs of glass inside them (holes)
        y, x = rng.integers(0, h), rng.integers(0, w)
        ry, rx = rng.integers(1, 30, 2)
        channel[((yy - y) / ry) ** 2 + ((xx - x) / rx) ** 2 < 1] = rng.choice([5, 120])
    channel[rng.random((h, w)) < 0.05] = 130  # specks
    for block in (5, 16, 33):
        for radius, min_px in ((2, 16), (1, 5), (0, 0), (3, 30)):
            _same(channel, block, closing_radius=radius, min_object_px=min_px)


def test_blank_channel_gives_an_empty_mask():
    channel = np.full((50, 70), 3, np.uint8)
    got, value = _blocked(channel, 16)
    assert not got.any() and value == threshold_channel(channel)[1]


def test_tissue_fraction_from_a_window_equals_the_whole_mask():
    rng = np.random.default_rng(4)
    mask = rng.random((60, 80)) > 0.5
    boxes = np.array([[x, y, 33.0, 33.0] for y in range(40, 200, 7) for x in range(0, 600, 11)])
    whole = tile_tissue_fraction(mask, boxes, (8.0, 8.0))
    part = tile_tissue_fraction(mask[4:28], boxes, (8.0, 8.0), window=(4, 0, 60, 80))
    assert np.array_equal(part, whole)
    with pytest.raises(ValueError, match="outside"):
        tile_tissue_fraction(mask[6:28], boxes, (8.0, 8.0), window=(6, 0, 60, 80))


def test_planning_by_small_blocks_equals_the_whole_image(test_data, tmp_path, monkeypatch):
    """plan_slide with 64-px blocks (~100 of them) and grid bands of four rows: the store's
    mask is threshold_channel of the channel, the kept tiles and fractions are those of the
    whole mask over the whole grid, and no scratch folder is left behind."""
    from hpcpath import tiling
    from hpcpath.config import TileConfig
    from hpcpath.store import open_store

    monkeypatch.setattr(tiling, "_MASK_BLOCK", 64)
    slide_path = test_data / "slides" / "cmu-1-small-region.svs"
    cfg = TileConfig(mask_mpp=2.0, tile_size=64, tissue_threshold=0.3)
    plan = tiling.plan_slide(str(slide_path), str(tmp_path), cfg)
    store = open_store(plan["store"], require_complete=False)
    mds = store.mask_downsample[0]
    with open_slide(slide_path) as s:
        mh, mw = store.root["tissue/mask"].shape
        read = tiling._channel_reader(s, mds, cfg.tissue_method)
        channel = np.zeros((mh, mw), np.uint8)
        for r in range(0, mh, 64):  # the same reads the task made
            for c in range(0, mw, 64):
                channel[r : r + 64, c : c + 64] = read(r, c, min(64, mh - r), min(64, mw - c))
        geom = tiling.tile_geometry(s.info, cfg)
    ref, value = threshold_channel(channel)
    assert np.array_equal(store.tissue_mask, ref)
    assert store.metadata.tissue.threshold == value
    index, boxes = tiling.tile_grid(geom)
    frac = tile_tissue_fraction(ref, boxes, (mds, mds))
    keep = (frac >= cfg.tissue_threshold) & (frac > 0)
    assert len(store.index) == plan["n_tiles"] == keep.sum() > 50
    assert np.array_equal(store.index, index[keep])
    assert np.array_equal(store.tissue_fraction, frac[keep])
    assert store.metadata.tiling.n_grid_tiles == len(index)
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]


def test_the_channel_reader_keeps_no_decoded_tile(test_data):
    """The tissue channel reads each native tile once: read_scaled(cache=False) gives the
    same pixels and leaves the reader's decoded-tile cache (up to ~50 MB) empty."""
    from hpcpath import tiling

    with open_slide(test_data / "slides" / "cmu-1-small-region.svs") as s:
        assert s.uses_direct(0)
        got = tiling._channel_reader(s, 4.0, "saturation")(0, 0, 300, 400)
        assert len(s._direct._cache) == 0
        assert np.array_equal(got, tissue_channel(s.read_scaled(0, 0, 400, 300, 4.0)))
        assert len(s._direct._cache) > 0


def test_a_small_mask_is_planned_in_memory_with_the_same_result(test_data, tmp_path, monkeypatch):
    """A mask of at most _MASK_WHOLE_BLOCKS blocks is detected in memory as one block (no
    scratch arrays), read in the same blocks: the store's mask, threshold, kept tiles and
    fractions equal those of the blocked path."""
    from hpcpath import tiling
    from hpcpath.config import TileConfig
    from hpcpath.store import open_store

    monkeypatch.setattr(tiling, "_MASK_BLOCK", 64)  # 741 x 554 mask: ~100 blocks either way
    slide_path = test_data / "slides" / "cmu-1-small-region.svs"
    cfg = TileConfig(mask_mpp=2.0, tile_size=64, tissue_threshold=0.3)
    blocked = open_store(tiling.plan_slide(str(slide_path), str(tmp_path / "blocked"), cfg)["store"],
                         require_complete=False)
    monkeypatch.setattr(tiling, "_MASK_WHOLE_BLOCKS", 1000)

    def no_scratch(*_a):
        raise AssertionError("a small mask needs no scratch arrays")

    monkeypatch.setattr(tiling, "mask_scratch", no_scratch)
    whole = open_store(tiling.plan_slide(str(slide_path), str(tmp_path / "whole"), cfg)["store"],
                       require_complete=False)
    assert np.array_equal(whole.tissue_mask, blocked.tissue_mask)
    assert whole.tissue_mask.sum() > 1000
    assert whole.metadata.tissue.threshold == blocked.metadata.tissue.threshold
    assert np.array_equal(whole.index, blocked.index) and len(whole.index) > 50
    assert np.array_equal(whole.tissue_fraction, blocked.tissue_fraction)
    assert [p.name for p in (tmp_path / "whole").iterdir()] == [whole.path.name]

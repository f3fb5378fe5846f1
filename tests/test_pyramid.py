"""The overview pyramid: built from the decoded tiles (decode path) or read from the slide
(passthrough), the same picture either way, side data gone when the store is complete.

Real Dask (two workers), so pyramid tasks run beside tile tasks and must wait for them.
"""

from __future__ import annotations

import numpy as np
import pytest

from hpcpath.config import TileConfig
from hpcpath.io import open_slide
from hpcpath.store import open_store
from hpcpath.tiling import tile_slides

W, H = 3000, 2600  # > 2048 at --pyramid-downsample 1: four base blocks and a last levels task


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    from hpcpath.synth import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("pyr") / "pyr.svs", W, H, seed=3).slide


def _tile(slide, out, dask_client, **options):
    res = tile_slides([slide], out, TileConfig(**options), client=dask_client)
    assert res.ok and res.n_tiles > 10, res.records
    store = open_store(out / "pyr.zarr")
    assert not (store.path / "tiles" / ".thumbs").exists()  # side data removed before complete
    return store, [np.moveaxis(np.asarray(a[:]), 0, -1) for a in store.pyramid]


def _kept(store, shape, d):
    m = np.zeros(shape[:2], bool)
    s = store.metadata.tiling.tile_size // d
    for x, y in store.index[:, :2] // d:
        m[y : y + s, x : x + s] = True
    return m


def test_full_resolution_pyramid_is_the_tiles_from_either_source(slide, tmp_path, dask_client):
    """At --pyramid-downsample 1 the thumbnails are the tiles themselves, and passthrough reads
    level 0: both pyramids are bit for bit the same, level 0 is each kept tile at its place,
    white elsewhere, and every upper level the 2x2 means of the one below (blocks and the
    last task agree at the block edges)."""
    dec, lv = _tile(slide, tmp_path / "dec", dask_client, passthrough="never", pyramid_downsample=1)
    pt, lv_pt = _tile(slide, tmp_path / "pt", dask_client, pyramid_downsample=1)
    assert dec.meta["tiling"]["pyramid_source"] == "tiles" and pt.meta["tiling"]["pyramid_source"] == "slide"
    assert pt.meta["tiling"]["tile_path"]["kind"] == "passthrough"
    assert [a.shape for a in lv] == [(H, W, 3), (1300, 1500, 3), (650, 750, 3), (325, 375, 3)]
    for a, b in zip(lv, lv_pt):
        np.testing.assert_array_equal(a, b)
    tiles = dec.tiles[:]
    for i, (x, y) in enumerate(dec.index[:, :2]):
        np.testing.assert_array_equal(lv[0][y : y + 256, x : x + 256], tiles[i])
    kept = _kept(dec, lv[0].shape, 1)
    assert (lv[0][~kept] == 255).all() and 0.1 < kept.mean() < 0.9
    for lo, hi in zip(lv, lv[1:]):
        pad = np.pad(lo, ((0, lo.shape[0] % 2), (0, lo.shape[1] % 2), (0, 0)), mode="edge").astype(np.uint16)
        mean = (pad[0::2, 0::2] + pad[1::2, 0::2] + pad[0::2, 1::2] + pad[1::2, 1::2] + 2) >> 2
        np.testing.assert_array_equal(hi, mean)


def test_pyramid_from_decoded_tiles_shows_the_slides_own_overview(slide, tmp_path, dask_client):
    """Default options (4x): the decode path's pyramid (thumbnails: box means of level 0)
    against the passthrough path's (the slide's own 4x level, exactly read_scaled there).
    The synthetic writer renders and JPEG-encodes each level on its own, so they agree to
    JPEG and resampling noise: measured mean 2.6, 99th percentile 11 levels on 8k slides;
    a tile misplaced by one thumbnail, or x and y swapped, gives means of 20-60."""
    dec, lv = _tile(slide, tmp_path / "dec", dask_client, passthrough="never")
    pt, lv_pt = _tile(slide, tmp_path / "pt", dask_client)
    assert dec.meta["tiling"]["pyramid_source"] == "tiles" and pt.meta["tiling"]["pyramid_source"] == "slide"
    np.testing.assert_array_equal(dec.index, pt.index)
    kept = _kept(dec, lv[0].shape, 4)
    assert (lv[0][~kept] == 255).all() and (lv_pt[0][~kept] == 255).all()
    diff = np.abs(lv[0].astype(int) - lv_pt[0])[kept]
    assert diff.mean() < 4 and np.percentile(diff, 99) < 16, (diff.mean(), np.percentile(diff, 99))
    with open_slide(slide) as s:  # passthrough's pyramid is the slide's 4x level where tiles are kept
        x, y = (int(v) for v in pt.index[len(pt.index) // 2, :2])
        np.testing.assert_array_equal(lv_pt[0][y // 4 : y // 4 + 64, x // 4 : x // 4 + 64],
                                      s.read_scaled(x, y, 64, 64, 4.0))


def test_sweeps_leave_no_decoded_tiles_in_the_cached_handle(slide, tmp_path):
    """The tissue sweep and the passthrough pyramid blocks (which read the slide's 4x level
    through the decoded-tile cache) leave the worker's cached handle empty: kept from task to
    task it held 256 decoded tiles (~50 MB) per slide handle."""
    from hpcpath.backends.inline import InlineBackend

    cfg = TileConfig()
    res = tile_slides([slide], tmp_path / "o", cfg, client=InlineBackend(1))  # tasks in this process
    assert res.ok and res.n_tiles > 10, res.records
    assert open_store(tmp_path / "o" / "pyr.zarr").meta["tiling"]["pyramid_source"] == "slide"
    handle = open_slide(str(slide), cfg.reader, cached=True)  # the handle the tasks used
    assert handle._direct is not None and handle.uses_direct(1)
    assert handle._direct._cache_tiles == 256 and len(handle._direct._cache) == 0

"""Tiling on real slides with a real Dask LocalCluster: stores, counts, pixels, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr

from hpcpath.config import TileConfig
from hpcpath.errors import ConfigError, OutputError, SlideError
from hpcpath.io import open_slide
from hpcpath.manifest import MANIFEST_NAME
from hpcpath.store import open_store
from hpcpath.tiling import TileGeometry, tile_geometry, tile_grid, tile_slides
from hpcpath.tissue import tile_tissue_fraction


# ---------------------------------------------------------------- pure parts
def _geom(w, h, tile=256, stride=256, ds=1.0, level=0):
    return TileGeometry(level, ds, ds, tile, tile, stride, (w, h), 0.5)


def test_tile_grid_counts_and_coordinates():
    index, boxes = tile_grid(_geom(1000, 600))
    assert len(index) == 3 * 2  # whole tiles only
    assert index[:, 0].tolist() == [0, 256, 512, 0, 256, 512]
    assert index[:, 1].tolist() == [0, 0, 0, 256, 256, 256]
    assert (boxes[:, 2:] == 256).all()
    index, _ = tile_grid(_geom(1000, 600, stride=128))  # overlap 128
    assert len(index) == 6 * 3
    index, boxes = tile_grid(_geom(600, 300, ds=4.0, level=2))
    assert index[1, 0] == 1024 and (index[:, 2] == 2).all() and boxes[0, 2] == 1024
    assert len(tile_grid(_geom(100, 100))[0]) == 0


def test_geometry_rules(test_data):
    with open_slide(test_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs") as s:
        with pytest.raises(SlideError, match="no MPP"):
            tile_geometry(s.info, TileConfig(mpp=1.0))
        g = tile_geometry(s.info, TileConfig(mpp=1.0, default_mpp=0.5))
        assert g.level == 1 and g.read_size == 256  # level 1 is ~2x: native pixels
        with pytest.raises(SlideError, match="level 5"):
            tile_geometry(s.info, TileConfig(level=5))
    with open_slide(test_data / "slides" / "cmu-1-small-region.svs") as s:
        g = tile_geometry(s.info, TileConfig(mpp=1.0))
        assert g.level == 0 and g.read_size == 513  # 256 * 1.0 / 0.499, resampled


def test_config_validation_is_one_line(tmp_path):
    bad = tmp_path / "tile.yaml"
    bad.write_text("tile:\n  tile_sise: 128\n")
    with pytest.raises(ConfigError) as err:
        TileConfig.load(bad)
    assert str(err.value) == f"{bad}: tile.tile_sise: unknown option (did you mean 'tile_size'?)"
    with pytest.raises(ConfigError, match="overlap must be smaller"):
        TileConfig.load(None, tile_size=64, overlap=64)
    with pytest.raises(ConfigError, match="level or mpp"):
        TileConfig.load(None, level=1, mpp=0.5)


# ---------------------------------------------------------------- real slides, real cluster
@pytest.fixture(scope="module")
def slides_run(tmp_path_factory, test_data, dask_client):
    out = tmp_path_factory.mktemp("tiles")
    inputs = [test_data / "slides", test_data / "bad", "/no/such/slide.svs"]
    result = tile_slides(inputs, out, TileConfig(), client=dask_client)
    return out, result


def test_every_good_slide_gets_a_complete_readable_store(slides_run):
    out, result = slides_run
    status = {r.slide_id: r.status for r in result.records}
    assert status == {
        "cmu-1-small-region": "complete",
        "tcga-cr-7395-01a-01-ts1": "complete",
        "test3-TRITC 2 (560)": "complete",
        "boxes": "empty",  # 300x250: smaller than one 256 tile
        "small": "empty",  # 16x16
        "dicom-boxes": "empty",  # 16x16 DICOM series
        "broken": "failed",
        "kidney-48-5": "failed",
        "not-a-wsi": "failed",
        "slide": "failed",
    }
    for sid, st in status.items():
        if st == "failed":
            assert not (out / f"{sid}.zarr").exists()
            continue
        store = open_store(out / f"{sid}.zarr")
        assert store.complete
        assert store.tiles.shape[1:] == (256, 256, 3) and store.tiles.dtype == np.uint8
        assert len(store.index) == len(store) == len(store.tissue_fraction)
        assert store.tissue_mask.ndim == 2 and store.pyramid
    manifest = json.loads((out / MANIFEST_NAME).read_text())["slides"]
    assert manifest["broken"]["error"] and "\n" not in manifest["broken"]["error"]
    assert manifest["slide"]["error"] == "no such file or folder"
    assert manifest["cmu-1-small-region"]["tiles"] == len(open_store(out / "cmu-1-small-region.zarr"))


@pytest.mark.parametrize("sid", ["cmu-1-small-region", "tcga-cr-7395-01a-01-ts1", "test3-TRITC 2 (560)"])
def test_tile_counts_match_the_stored_tissue_mask(slides_run, sid):
    out, _ = slides_run
    store = open_store(out / f"{sid}.zarr")
    meta = store.meta
    w0, h0 = meta["slide"]["level_dimensions"][0]
    t = meta["tiling"]["tile_size"]
    cols, rows = w0 // t, h0 // t
    yy, xx = np.mgrid[:rows, :cols]
    boxes = np.stack([xx.ravel() * t, yy.ravel() * t, np.full(xx.size, t), np.full(xx.size, t)], 1)
    ds = store.root["tissue/mask"].attrs["downsample"]
    frac = tile_tissue_fraction(store.tissue_mask, boxes, tuple(ds))
    expected = np.flatnonzero((frac >= meta["tiling"]["tissue_threshold"]) & (frac > 0))
    assert len(store) == len(expected) > 0
    got = store.index[:, 3] * cols + store.index[:, 4]
    assert got.tolist() == expected.tolist()
    np.testing.assert_allclose(store.tissue_fraction, frac[expected], rtol=1e-6)


@pytest.mark.parametrize("sid, src", [
    ("cmu-1-small-region", "cmu-1-small-region.svs"),
    ("tcga-cr-7395-01a-01-ts1", "tcga-cr-7395-01a-01-ts1.svs"),
    ("test3-TRITC 2 (560)", "test3-TRITC 2 (560).ndpi"),
])
def test_tile_pixels_equal_openslide_read_region(slides_run, test_data, sid, src):
    out, _ = slides_run
    store = open_store(out / f"{sid}.zarr")
    index, tiles = store.index, store.tiles
    picks = range(len(index)) if len(index) <= 64 else np.random.default_rng(0).choice(len(index), 48, replace=False)
    with openslide.OpenSlide(str(test_data / "slides" / src)) as osr:
        for i in picks:
            x, y, level = (int(v) for v in index[i, :3])
            ref = np.asarray(osr.read_region((x, y), level, (256, 256)))[..., :3]
            np.testing.assert_array_equal(tiles[int(i)], ref)


def test_store_metadata_and_ngff_pyramid(slides_run):
    out, _ = slides_run
    store = open_store(out / "cmu-1-small-region.zarr")
    meta = store.meta
    assert meta["slide"]["mpp"] == pytest.approx([0.499, 0.499])
    assert meta["slide"]["vendor"] == "aperio" and meta["slide"]["source_name"] == "cmu-1-small-region.svs"
    assert meta["tiling"]["tile_size"] == 256 and meta["version"]
    ome = store.root["image"].attrs["ome"]
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"][1] == pytest.approx(0.499 * 4)
    base = store.pyramid[0]
    assert base.shape == (3, -(-2967 // 4), -(-2220 // 4))
    # the pyramid shows the kept tiles, built from their decoded pixels (thumbnails): at each
    # tile's place the box-averaged slide region, within 1 (PIL's reduce rounds halves up,
    # read_scaled's mean to even), and the slide's background colour everywhere else
    assert meta["tiling"]["pyramid_source"] == "tiles"
    src = json.loads((out / MANIFEST_NAME).read_text())["slides"]["cmu-1-small-region"]["source"]
    pyr = np.moveaxis(np.asarray(base[:]), 0, -1).astype(int)
    kept = np.zeros(pyr.shape[:2], bool)
    with open_slide(src) as s:
        assert (s.background == 255).all()
        for x, y in store.index[:, :2]:
            ref = s.read_scaled(x, y, 64, 64, 4.0)
            got = pyr[y // 4 : y // 4 + 64, x // 4 : x // 4 + 64]
            assert np.abs(got - ref).max() <= 1 and (got != ref).mean() < 0.05  # ties: 1 in 32
            kept[y // 4 : y // 4 + 64, x // 4 : x // 4 + 64] = True
    assert (pyr[~kept] == 255).all() and 0 < kept.mean() < 1
    assert store.pyramid[-1].shape[1] <= 512
    assert not (store.path / "tiles" / ".thumbs").exists()  # side data gone once complete


def test_no_identifying_data_in_stores(slides_run):
    out, _ = slides_run
    texts = [p.read_text() for p in (out / "cmu-1-small-region.zarr").rglob("zarr.json")]
    blob = "\n".join(texts)
    for secret in ("b414003d", "Filename", "ScanScope", "CPAPERIOCS", "12/29/09", "associated", "Aperio Image"):
        assert secret not in blob
    assert not any("label" in p.name or "macro" in p.name for p in (out / "cmu-1-small-region.zarr").rglob("*"))


def test_rerun_skips_complete_and_redoes_partial(slides_run, dask_client):
    out, first = slides_run
    store_dir = out / "cmu-1-small-region.zarr"
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*") if p.is_file()}
    # make tcga partial: drop its marker as a killed run would leave it
    root = zarr.open_group(str(out / "tcga-cr-7395-01a-01-ts1.zarr"), mode="r+")
    meta = dict(root.attrs["hpcpath"])
    meta["complete"] = False
    root.attrs["hpcpath"] = meta
    ref = open_store(out / "tcga-cr-7395-01a-01-ts1.zarr", require_complete=False).tiles[:]
    src = Path(json.loads((out / MANIFEST_NAME).read_text())["slides"]["cmu-1-small-region"]["source"]).parent
    result = tile_slides([src], out, TileConfig(), client=dask_client)
    by = {r.slide_id: r for r in result.records}
    assert by["cmu-1-small-region"].reused and not by["tcga-cr-7395-01a-01-ts1"].reused
    assert by["tcga-cr-7395-01a-01-ts1"].status == "complete"
    after = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*") if p.is_file()}
    assert after == before  # untouched
    np.testing.assert_array_equal(open_store(out / "tcga-cr-7395-01a-01-ts1.zarr").tiles[:], ref)


def test_jpeg_codec_store_is_smaller_and_close(tmp_path, test_data, dask_client):
    src = test_data / "slides" / "cmu-1-small-region.svs"
    lossless = tile_slides([src], tmp_path / "lz4", TileConfig(pyramid=False), client=dask_client)
    jpeg = tile_slides([src], tmp_path / "jpeg", TileConfig(codec="jpeg", jpeg_quality=90, pyramid=False), client=dask_client)
    assert lossless.ok and jpeg.ok
    a = open_store(tmp_path / "lz4" / "cmu-1-small-region.zarr").tiles[:]
    b = open_store(tmp_path / "jpeg" / "cmu-1-small-region.zarr").tiles[:]
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3.0

    def size(d):
        return sum(p.stat().st_size for p in (d / "cmu-1-small-region.zarr" / "tiles" / "images").rglob("*") if p.is_file())

    assert size(tmp_path / "jpeg") * 3 < size(tmp_path / "lz4")


def test_target_mpp_resamples(tmp_path, test_data, dask_client):
    src = test_data / "slides" / "cmu-1-small-region.svs"
    res = tile_slides([src], tmp_path, TileConfig(mpp=1.0, tile_size=128, pyramid=False), client=dask_client)
    assert res.ok
    store = open_store(tmp_path / "cmu-1-small-region.zarr")
    assert store.tiles.shape[1:] == (128, 128, 3)
    assert store.meta["tiling"]["tile_mpp"] == 1.0
    x, y = (int(v) for v in store.index[0, :2])
    with open_slide(src) as s:
        ref = s.read_scaled(x, y, 128, 128, 1.0 / 0.499)
    assert np.abs(store.tiles[0].astype(int) - ref.astype(int)).mean() < 2.0


def test_unwritable_output_is_an_output_error(tmp_path, test_data, dask_client):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as err:
        tile_slides([test_data / "slides" / "small.svs"], blocker / "out", client=dask_client)
    assert str(err.value).startswith(str(blocker / "out") + ": ")


def test_synthetic_phi_never_reaches_store_or_manifest(tmp_path, dask_client):
    from hpcpath.synth import write_synthetic_slide

    truth = write_synthetic_slide(tmp_path / "slides" / "case.svs", 2048, 2048, seed=4)
    assert truth.phi  # the generator planted identifiers in the header and label image
    res = tile_slides([tmp_path / "slides"], tmp_path / "out", TileConfig(), client=dask_client)
    assert res.ok
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for secret in truth.phi:
                assert secret.encode() not in data, (p, secret)
            assert b"01/01/26" not in data
    store = open_store(tmp_path / "out" / "case.zarr")
    assert set(store.root.group_keys()) == {"image", "tissue", "tiles"}

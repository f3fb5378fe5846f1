"""Passthrough stores (issue 12): the slide's own JPEG / JPEG 2000 tiles as the tile array's
chunks, byte for byte, decoding to exactly OpenSlide's pixels; everything else falls back
to the decode path with the reason recorded."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from hpcpath.config import TileConfig
from hpcpath.tiling import plan_slide, task_ranges, write_tiles


def tile_here(slide: Path, out: Path, **options):
    """The tiling unit functions in this process (plan, then every write_tiles task)."""
    cfg = TileConfig(pyramid=False, **options)
    plan = plan_slide(str(slide), str(out), cfg)
    assert "error" not in plan, plan
    for a, b in task_ranges(plan["n_tiles"], cfg.tiles_per_task):
        write_tiles(str(slide), plan["store"], cfg, a, b)
    root = zarr.open_group(plan["store"], mode="r")
    return root, root.attrs["hpcpath"]["tiling"]["tile_path"]


def openslide_tiles(slide: Path, index: np.ndarray, t: int) -> np.ndarray:
    import openslide

    osr = openslide.OpenSlide(str(slide))
    try:
        return np.stack([np.asarray(osr.read_region((int(x), int(y)), int(lv), (t, t)))[..., :3]
                         for x, y, lv, *_ in index])
    finally:
        osr.close()


def shard_chunks(root, store: Path) -> list[bytes]:
    """Every inner chunk's bytes, in tile order, parsed from the shard files on disk."""
    images = root["tiles/images"]
    per, n = images.shards[0], images.shape[0]
    out = []
    for s in range(-(-n // per)):
        data = (store / "tiles" / "images" / images.metadata.encode_chunk_key((s, 0, 0, 0))).read_bytes()
        index = np.frombuffer(data[len(data) - 16 * per - 4 : -4], "<u8").reshape(per, 2)
        out += [data[o : o + k] for o, k in index[: min(per, n - s * per)].tolist()]
    return out


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pt-synth")
    proc = subprocess.run([sys.executable, "-m", "hpcpath.cli.main", "synth", "-o", str(out), "-n", "1",
                           "--size", "2048", "--seed", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "slide_000.svs"


def test_chunks_are_the_source_tiles_with_tables_merged(test_data, tmp_path):
    """Aperio CMU-1 (240-px JPEG tiles, shared JPEGTables, RGB samples, no colour marker):
    each chunk is the tile's stored bytes, the page's tables and an Adobe marker in front."""
    import tifffile

    from hpcpath.passthrough import standalone_jpeg

    slide = test_data / "slides" / "cmu-1-small-region.svs"
    root, how = tile_here(slide, tmp_path, tile_size=240, chunk_tiles=16, tiles_per_task=32)
    assert how == {"kind": "passthrough", "format": "jpeg", "reason": None}
    assert root["tiles/images"].attrs["codec"] == "passthrough-jpeg"
    index = root["tiles/index"][:]
    chunks = shard_chunks(root, Path(root.store.root))
    assert len(chunks) == len(index) > 16  # several shards, one tile per chunk
    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        tables = page.jpegtables
        assert tables and len(tables) > 100
        ncols = -(-page.imagewidth // 240)
        for (x, y, *_), chunk in zip(index, chunks):
            i = (y // 240) * ncols + x // 240
            tif.filehandle.seek(page.dataoffsets[i])
            raw = tif.filehandle.read(page.databytecounts[i])
            assert chunk.endswith(raw[2:])  # the entropy-coded tile, byte for byte
            assert tables[2:-2] in chunk  # quantisation and Huffman tables merged in
            assert b"\xff\xee\x00\x0eAdobe" in chunk  # colour space named (RGB samples)
            assert chunk == standalone_jpeg(tables, raw, 2)
            assert len(chunk) <= len(raw) + len(tables) + 16


@pytest.mark.parametrize("name,tile,fmt", [("cmu-1-small-region.svs", 240, "jpeg"),
                                           ("tcga-cr-7395-01a-01-ts1.svs", 256, "jpeg2k")])
def test_every_tile_decodes_to_openslides_pixels(test_data, tmp_path, name, tile, fmt):
    """Plain zarr reads, the ChunkReader fast path and a third-party decoder (PIL) all give
    exactly OpenSlide's read_region at each tile."""
    from hpcpath.chunkread import ChunkReader

    slide = test_data / "slides" / name
    root, how = tile_here(slide, tmp_path, tile_size=tile, chunk_tiles=16, tiles_per_task=32)
    assert how["kind"] == "passthrough" and how["format"] == fmt
    images = root["tiles/images"]
    want = openslide_tiles(slide, root["tiles/index"][:], tile)
    assert np.array_equal(images[:], want)
    reader = ChunkReader(images)
    assert reader.direct and reader.rows_per_chunk == 16
    got = np.concatenate([reader.read(a, min(a + 16, len(want))) for a in range(0, len(want), 16)])
    assert np.array_equal(got, want)
    from hpcpath.infer.reader import tile_pieces  # what inference tasks read

    pieces = list(tile_pieces(images, 5, len(want)))
    assert np.array_equal(np.concatenate([p["main"] for _, p in pieces]), want[5:])
    assert np.array_equal(np.concatenate([k for k, _ in pieces]), np.arange(5, len(want)))
    if fmt == "jpeg":  # a standalone JPEG to any decoder
        chunk = shard_chunks(root, Path(root.store.root))[3]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(chunk)).convert("RGB")), want[3])


def test_synthetic_slide_passthrough_and_never(synth_slide, tmp_path):
    """An `hpcpath synth` slide (256-px JPEG tiles): passthrough is exact; --passthrough never
    gives the old decode path (Blosc-lz4 chunks of 64 tiles, no shards) with the same pixels."""
    root, how = tile_here(synth_slide, tmp_path / "auto")
    assert how["kind"] == "passthrough"
    images = root["tiles/images"]
    assert images.shards is not None and images.chunks[0] == 1
    index = root["tiles/index"][:]
    assert np.array_equal(images[:], openslide_tiles(synth_slide, index, 256))
    from hpcpath.store import open_store

    blocks = open_store(tmp_path / "auto" / "slide_000.zarr", require_complete=False).tiles_dask()
    assert blocks.chunks[0][0] == images.shards[0]  # a dask block per shard file, not per tile
    assert np.array_equal(blocks.compute(), images[:])
    old, how_never = tile_here(synth_slide, tmp_path / "never", passthrough="never")
    assert how_never == {"kind": "decode", "format": "blosc-lz4", "reason": "--passthrough never"}
    arr = old["tiles/images"]
    assert arr.shards is None and arr.attrs["codec"] == "blosc-lz4"
    assert np.array_equal(old["tiles/index"][:], index)
    assert np.array_equal(arr[:], images[:])


@pytest.mark.parametrize("name,options,reason", [
    ("cmu-1-small-region.svs", {"tile_size": 240, "overlap": 16}, "overlap 16"),
    ("cmu-1-small-region.svs", {"tile_size": 256}, "native tiles are 240x240, the tile grid 256x256"),
    ("boxes.tiff", {"tile_size": 64, "tissue_threshold": 0.0}, "not JPEG or JPEG 2000"),
])
def test_slides_that_do_not_qualify_fall_back_with_the_reason(test_data, tmp_path, name, options, reason):
    root, how = tile_here(test_data / "slides" / name, tmp_path, **options)
    assert how["kind"] == "decode" and how["format"] == "blosc-lz4"
    assert reason in how["reason"]
    assert root["tiles/images"].shards is None


def test_cli_tile_dataset_train_reader_on_a_passthrough_store(synth_slide, tmp_path):
    """The user's path: hpcpath tile (passthrough by default) -> dataset build -> the
    training reader (NumPy batches and tf.data) decoding the stored JPEG tiles."""
    import yaml

    from hpcpath.dataset import open_dataset

    cfg = tmp_path / "split.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": {"split": {"fractions": [1.0, 0.0, 0.0]}}}))
    slides = synth_slide.parent
    run = [sys.executable, "-m", "hpcpath.cli.main"]
    for args in (["tile", slides, "-o", tmp_path / "stores", "--workers", "1"],
                 ["dataset", "build", tmp_path / "stores", "-a", slides, "-o", tmp_path / "tumor.json",
                  "--config", cfg, "--workers", "1"]):
        proc = subprocess.run([*run, *map(str, args)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    root = zarr.open_group(str(tmp_path / "stores" / "slide_000.zarr"), mode="r")
    assert root.attrs["hpcpath"]["tiling"]["tile_path"]["kind"] == "passthrough"
    ds = open_dataset(tmp_path / "tumor.json")
    assert len(ds) == root["tiles/images"].shape[0] and int(ds.labels.sum()) > 0
    batch = next(ds.batches(len(ds)))  # unshuffled: store order
    assert np.array_equal(batch.images, openslide_tiles(synth_slide, root["tiles/index"][:], 256))
    x, y = next(iter(ds.select("train").to_tf(8, shuffle=True)))
    assert tuple(x.shape) == (8, 256, 256, 3) and x.dtype.name == "uint8" and tuple(y.shape) == (8,)
    # the stored JPEG tiles decoded inside tf.data (tf.io.decode_jpeg): the same pixels
    assert ds.encoded_format() == "jpeg"
    enc = next(ds.batches(len(ds), encoded=True)).images
    assert enc.dtype == object and enc[0][:2] == b"\xff\xd8"
    got = np.concatenate([x.numpy() for x, _ in ds.to_tf(8, shuffle=False, decode="tf")])
    assert np.array_equal(got, batch.images)
    # hpcpath train with the JPEG decode inside tf.data (-s jpeg_decode=tf), one short epoch
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train-small-cnn.yaml").read_text())
    recipe["train"]["val_split"] = None  # one slide: all of it is train
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(recipe))
    proc = subprocess.run([*run, "train", str(tmp_path / "train.yaml"), "--dataset", str(tmp_path / "tumor.json"),
                           "-o", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4",
                           "-s", "jpeg_decode=tf", "-s", "augment=false"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len((tmp_path / "run" / "history.csv").read_text().strip().splitlines()) == 2


def test_a_shard_write_killed_midway_leaves_nothing_in_the_finished_store(synth_slide, tmp_path):
    """A task killed between writing a shard's temporary file and renaming it (then retried,
    as Spark and Dask do) leaves ``<shard>.<pid>.tmp``; finishing the store removes it before
    marking it complete, so the finished store holds the same files as a clean run."""
    from hpcpath.tiling import finalize_store

    root, _ = tile_here(synth_slide, tmp_path / "auto")
    store = Path(root.store.root)
    shard = next(p for p in (store / "tiles" / "images").rglob("*") if p.is_file() and p.name != "zarr.json")
    left = shard.with_name(shard.name + ".4242.tmp")
    left.write_bytes(shard.read_bytes()[:100])  # the killed write
    n = root["tiles/index"].shape[0]
    finalize_store(str(store), n, n)
    assert not left.exists()
    assert not list(store.rglob("*.tmp"))
    assert zarr.open_group(str(store), mode="r").attrs["hpcpath"].get("complete")


def test_shards_from_file_ranges_equal_by_kernel_copy_and_by_buffer(tmp_path, monkeypatch):
    """write_shard_parts: chunks given as (prefix, offset, length) of the slide file give the
    same shard whether the kernel copies the ranges (copy_file_range) or the fallback for
    file systems that refuse it reads and writes them; a range past the file's end is an
    EOFError and leaves no shard behind."""
    from hpcpath import passthrough as pt

    data = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    (tmp_path / "src").write_bytes(data)
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        parts = [b"whole chunk", (b"\xff\xd8", 10, 1000), (b"", 5000, 200_000), (b"ab", 299_000, 1000)]
        want = (b"whole chunk" + b"\xff\xd8" + data[10:1010] + data[5000:205_000] + b"ab" + data[299_000:]
                + pt._shard_index([11, 1002, 200_000, 1002], 8))
        got = {}
        for kernel in (True, False):
            monkeypatch.setattr(pt, "_KERNEL_COPY", kernel)
            path = tmp_path / f"out{kernel}" / "c" / "0"
            pt.write_shard_parts(str(path), parts, 8, fd)
            got[kernel] = path.read_bytes()
        assert got[True] == got[False] == want
        for kernel in (True, False):
            monkeypatch.setattr(pt, "_KERNEL_COPY", kernel)
            with pytest.raises(EOFError):
                pt.write_shard_parts(str(tmp_path / "cut" / "0"), [(b"", 299_500, 1000)], 8, fd)
            assert not list((tmp_path / "cut").iterdir())
    finally:
        os.close(fd)


def test_jpeg_prefix_needs_the_whole_header():
    """The bytes put before a tile's body come from its first bytes only when those hold its
    whole header; a header cut short gives None (the caller reads the whole tile)."""
    from hpcpath.passthrough import jpeg_prefix, standalone_jpeg

    tile = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tile, "JPEG", icc_profile=b"x" * 6000)
    raw = tile.getvalue()
    whole = standalone_jpeg(None, raw, 2)
    assert jpeg_prefix(None, raw, 2) + raw[2:] == whole
    assert jpeg_prefix(None, raw[:4096], 2) is None  # the ICC profile's APP2 runs past 4 kB


def test_native_chunks_reuse_a_header_only_when_it_is_the_same(tmp_path):
    """NativeChunks reuses the last tile's prefix for a tile with the same header: a tile
    whose header adds a colour marker before its scan gets its own prefix (no Adobe marker
    added), which is what standalone_jpeg makes of the whole tile."""
    import tifffile

    from hpcpath.io import open_slide
    from hpcpath.passthrough import NativeChunks, standalone_jpeg

    def jpeg(adobe: bool) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(buf, "JPEG", quality=90)
        raw = buf.getvalue()
        assert raw[2:4] == b"\xff\xe0"  # drop PIL's JFIF segment: no colour marker at all
        raw = raw[:2] + raw[4 + int.from_bytes(raw[4:6], "big"):]
        cut = raw.index(b"\xff\xda")  # insert an APP14 right before the scan
        return raw[:cut] + (b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" if adobe else b"") + raw[cut:]

    tiles = [jpeg(False), jpeg(True), jpeg(False)]
    path = tmp_path / "t.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(iter([np.zeros((16, 16, 3), np.uint8)] * 3), shape=(16, 48, 3), dtype=np.uint8,
                 tile=(16, 16), compression="jpeg", photometric="rgb")
    # swap in the hand-made streams: the same byte counts are not needed, offsets are read
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    slide = open_slide(path)
    page = slide.native_page(0)
    if page is None:
        pytest.skip("this TIFF is not read directly")
    data = bytearray(path.read_bytes())
    end = len(data)
    for i, t in enumerate(tiles):
        offsets[i], counts[i] = end + sum(map(len, tiles[:i])), len(t)
    path.write_bytes(bytes(data) + b"".join(tiles))
    page.dataoffsets, page.databytecounts = offsets, counts
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = NativeChunks(slide, fd, "jpeg", 0)
        for i, t in enumerate(tiles):
            prefix, offset, length = chunks.get(16 * i, 0)
            body = os.pread(fd, length, offset)
            assert prefix + body == standalone_jpeg(page.jpegtables, t, int(page.photometric)), i
    finally:
        os.close(fd)

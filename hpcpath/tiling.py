"""Slides -> Zarr stores, as tasks (Dask, Spark) that each read one region and write their own chunks.

Per slide the graph is::

    plan (worker): open slide, tissue mask at low resolution, tile grid, create the store
      -> write_tiles[a:b] (workers, one per run of whole chunks; thumbnails for the pyramid)
      -> write_pyramid_blocks[2048 px blocks] (after the tiles) -> [write_pyramid_levels]
      -> finalize (side arrays removed, marker last)

The driver submits tasks and receives only counts and small metadata, never pixels (the
PathML design gathers tiles on the driver, which is the bottleneck to avoid).  Every task
writes whole chunks that no other task touches, so a task retried after a lost worker
rewrites the same bytes.  A store becomes complete only after every task reported success.

Pure helpers (``tile_grid``) are separate from the code that moves pixels, so they test
without a cluster.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hpcpath._malloc import keep_large_buffers, trim_after
from hpcpath.config import TileConfig
from hpcpath.errors import HpcpathError, OutputError, SlideError
from hpcpath.io import SlideInfo, discover_slides, open_slide, slide_id_for
from hpcpath.io.discover import duplicate_ids
from hpcpath.manifest import Manifest, SlideRecord
from hpcpath.runlock import run_lock
from hpcpath.stage import Unit, one_line, run_per_slide
from hpcpath.store import (
    FLAT_CHUNK_KEYS,
    MASK_CHUNK,
    StoreMeta,
    TilingMeta,
    TissueMeta,
    check_output_dir,
    create_slide_store,
    is_complete,
    mark_complete,
    mask_scratch,
    open_group,
    open_store,
    pyramid_levels,
    remove_store,
    store_path,
)
from hpcpath.tissue import _blocks, box_pixels, threshold_blocked, tile_tissue_fraction, tissue_channel

__all__ = ["TileGeometry", "tile_geometry", "tile_grid", "tile_slides", "RunResult"]

_PYRAMID_CHUNK = 1024
_PYRAMID_MIN = 512
_PYRAMID_BLOCK = 2 * _PYRAMID_CHUNK  # base px per pyramid task side: whole chunks of levels 0 and 1
_PYRAMID_BLOCKS_PER_TASK = 4  # blocks a pyramid task writes (fewer round trips; still parallel)
_THUMBS = ".thumbs"  # tiles/.thumbs: each kept tile at the pyramid's base scale, removed at finalize
_MASK_BLOCK = MASK_CHUNK  # tissue-mask px per block side (blockwise detection, store chunks)
_MASK_READ = 4096 * 4096  # slide-level px per read while building the tissue channel
# a mask of up to this many blocks' px is detected in memory as one block (no scratch files):
# its few arrays (~20 B a px at most) are bounded, the same for every slide above ~23k px at 16x
_MASK_WHOLE_BLOCKS = 2


# ----------------------------------------------------------------------------- pure helpers
@dataclass(frozen=True)
class TileGeometry:
    """Where tiles come from: read ``read_size`` px at ``level`` and resize to ``tile_size``.

    ``downsample`` is level-0 pixels per output pixel; ``out_dims`` the slide's size in
    output pixels.  At a native level ``read_size == tile_size`` and nothing is resampled.
    """

    level: int
    downsample: float
    level_downsample: float
    read_size: int
    tile_size: int
    stride: int
    out_dims: tuple[int, int]
    mpp: float | None


def tile_geometry(info: SlideInfo, cfg: TileConfig) -> TileGeometry:
    """Choose level and resampling for a slide; raises SlideError when the slide cannot
    meet the request (level missing, MPP unknown)."""
    mpp0 = info.mpp[0] if info.mpp else cfg.default_mpp
    if cfg.mpp is not None:
        if mpp0 is None:
            raise SlideError(
                "slide has no MPP in its header and no objective power; "
                "tile by --level or pass --default-mpp",
                info.source_name,
            )
        f = cfg.mpp / mpp0
        if f < 0.99:
            raise SlideError(
                f"target MPP {cfg.mpp} is finer than the scan ({mpp0:.4f}); no upsampling",
                info.source_name,
            )
        level = 0
        for i, d in enumerate(info.level_downsamples):
            if d <= f * 1.01:
                level = i
        lds = info.level_downsamples[level]
        read = int(round(cfg.tile_size * f / lds))
        if abs(read - cfg.tile_size) <= max(1, cfg.tile_size // 100):
            read = cfg.tile_size  # within 1%: take native pixels, do not resample
        w0, h0 = info.level_dimensions[0]
        out = (int(w0 / f), int(h0 / f))
        if read == cfg.tile_size:
            out = info.level_dimensions[level]
            f = lds
        return TileGeometry(level, f, lds, read, cfg.tile_size, cfg.stride, out, cfg.mpp)
    level = cfg.level or 0
    if level >= len(info.level_dimensions):
        raise SlideError(
            f"level {level} requested but the slide has {len(info.level_dimensions)} levels",
            info.source_name,
        )
    lds = info.level_downsamples[level]
    mpp = mpp0 * lds if mpp0 else None
    return TileGeometry(
        level, lds, lds, cfg.tile_size, cfg.tile_size, cfg.stride, info.level_dimensions[level], mpp
    )


def grid_shape(geom: TileGeometry) -> tuple[int, int]:
    """(rows, columns) of whole tiles in the grid."""
    wo, ho = geom.out_dims
    t, s = geom.tile_size, geom.stride
    return ((ho - t) // s + 1 if ho >= t else 0), ((wo - t) // s + 1 if wo >= t else 0)


def tile_grid(geom: TileGeometry, rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every whole tile of the grid, row-major: (index (n, 5) int64, boxes (n, 4) float64).

    index columns are INDEX_COLUMNS (x, y at level 0, level, row, col); boxes are the tiles'
    level-0 footprints (x, y, w, h) for tissue fractions.  Partial edge tiles are dropped.
    ``rows=(a, b)``: grid rows [a, b) only (planning walks a big grid band by band).
    """
    t, s = geom.tile_size, geom.stride
    n_rows, cols = grid_shape(geom)
    a, b = rows or (0, n_rows)
    grid_r, grid_c = np.meshgrid(np.arange(a, b), np.arange(cols), indexing="ij")
    rr, cc = grid_r.ravel(), grid_c.ravel()
    x0 = np.round(cc * s * geom.downsample).astype(np.int64)
    y0 = np.round(rr * s * geom.downsample).astype(np.int64)
    index = np.stack([x0, y0, np.full_like(x0, geom.level), rr, cc], axis=1).astype(np.int64)
    side = t * geom.downsample
    boxes = np.stack([x0, y0, np.full(len(x0), side), np.full(len(x0), side)], 1).astype(float)
    return index, boxes


def task_ranges(n: int, per_task: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_task, n)) for a in range(0, n, per_task)]


def pyramid_shapes(info: SlideInfo, base_downsample: float) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level: base, then halving until <= _PYRAMID_MIN."""
    w0, h0 = info.dimensions
    w, h = max(1, math.ceil(w0 / base_downsample)), max(1, math.ceil(h0 / base_downsample))
    shapes = [(h, w)]
    while max(h, w) > _PYRAMID_MIN:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        shapes.append((h, w))
    return shapes


def _half(block: np.ndarray) -> np.ndarray:
    """2x2 means (rounded half up) of a (c, h, w) uint8 block, the pyramid arrays' axis
    order; an odd last row or column is averaged with itself.  PIL's reduce of each plane as
    a greyscale image: a C loop, ~3x numpy's strided sums, and a plane goes in without the
    copy an RGB image needs (PIL keeps RGB as 4 bytes a pixel), so blocks stay channel-first
    from the slide read to the chunk writes, never transposed back and forth."""
    from PIL import Image

    c, h, w = block.shape
    out = np.empty((c, -(-h // 2), -(-w // 2)), np.uint8)
    for i in range(c):
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(block[i])).reduce(2))
    return out


def pyramid_source(geom: TileGeometry, cfg: TileConfig, passthrough: bool) -> tuple[str, int]:
    """Where the pyramid's base pixels come from, and the thumbnail side.

    ``("tiles", s)``: the decode path keeps each tile, box-averaged to the pyramid's scale
    (``s`` px a side), while it has it decoded; the pyramid is assembled from those.  It needs
    tiles that sit on the pyramid's pixel grid: no overlap, and a whole number of tile pixels
    per pyramid pixel that divides the tile.  ``("slide", 0)``: passthrough (tiles are never
    decoded) or other geometry: the kept tiles' footprints are read from the slide's best
    level for the pyramid's scale.  Either way only kept tiles' areas are drawn.
    """
    if passthrough or geom.stride != geom.tile_size:
        return "slide", 0
    r = cfg.pyramid_downsample / geom.downsample
    k = int(round(r))
    if k < 1 or abs(r - k) > 1e-9 or geom.tile_size % k:
        return "slide", 0
    return "tiles", geom.tile_size // k


def thumbnails(batch: np.ndarray, k: int) -> np.ndarray:
    """(n, t, t, 3) uint8 tiles -> (n, t/k, t/k, 3): means of k x k pixels, rounded half up.

    PIL's reduce over the tiles stacked as one tall image, one C call per chunk: ~0.11 ms a
    256-px tile at k=4, 5x faster than ``hpcpath.io.box_reduce`` (which rounds halves to
    even, as ``read_scaled`` must; the two differ by 1 on ~3% of values, at exact halves)."""
    if k == 1:
        return batch
    from PIL import Image

    n, h, w, c = batch.shape
    img = Image.fromarray(np.ascontiguousarray(batch).reshape(n * h, w, c)).reduce(k)
    return np.asarray(img).reshape(n, h // k, w // k, c)


def owned_levels(shapes: list[tuple[int, int]], r0: int, r1: int, c0: int, c1: int) -> int:
    """How many pyramid levels, from the base, the base block [r0:r1, c0:c1] covers in whole
    chunks (so one task may write them from the block in memory).

    >>> owned_levels([(2048, 2048), (1024, 1024), (512, 512)], 0, 2048, 0, 2048)
    3
    >>> owned_levels([(5000, 5000), (2500, 2500), (1250, 1250), (625, 625)], 2048, 4096, 0, 2048)
    2
    """
    n = 0
    for h, w in shapes:
        for a, b, size in ((r0, r1, h), (c0, c1, w)):
            ch = min(size, _PYRAMID_CHUNK)
            if a % ch or (b != size and b % ch):
                return n
        n += 1
        if r0 % 2 or c0 % 2:
            return n
        r0, r1, c0, c1 = r0 // 2, -(-r1 // 2), c0 // 2, -(-c1 // 2)
    return n


def pyramid_blocks(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
    """The base blocks (row, column origins) pyramid tasks write, and how many levels each
    writes from memory (the same for all; a last task makes the rest)."""
    h, w = shapes[0]
    blocks = [(r, c) for r in range(0, h, _PYRAMID_BLOCK) for c in range(0, w, _PYRAMID_BLOCK)]
    levels = min(owned_levels(shapes, r, min(h, r + _PYRAMID_BLOCK), c, min(w, c + _PYRAMID_BLOCK))
                 for r, c in blocks)
    return blocks, levels


# ----------------------------------------------------------------------------- worker tasks
def _channel_reader(slide, downsample: float, method: Literal["saturation", "od"]):
    """``read_channel`` for :func:`hpcpath.tissue.threshold_blocked`: a block of the slide's
    uint8 tissue channel at ``downsample``, read in strips of rows where the block's pixels
    at the level read would pass ``_MASK_READ`` (a slide with level 0 only, read at 1/16)."""
    k = downsample / slide.info.level_downsamples[slide.best_level(downsample)]

    def read(r0: int, c0: int, h: int, w: int) -> np.ndarray:
        step = max(1, int(_MASK_READ // max(1.0, w * k * k)))
        out = np.empty((h, w), np.uint8)
        for a in range(0, h, step):
            b = min(h, a + step)
            rgb = slide.read_scaled(c0 * downsample, (r0 + a) * downsample, w, b - a, downsample,
                                    cache=False)  # each tile once: keep the decoded-tile cache out
            out[a:b] = tissue_channel(rgb, method)
        return out

    return read


def _kept_tiles(geom: TileGeometry, mask, mds: float, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The kept tiles, row-major (index, tissue fractions), and the grid's tile count.

    A band of grid rows at a time (about one mask block tall), and in it a run of columns
    at a time, reading only the mask block under it: neither the whole grid's boxes nor a
    whole-width strip of the mask (whose integer sums cost 4 bytes a pixel) is held."""
    rows, cols = grid_shape(geom)
    index_parts, frac_parts = [np.zeros((0, 5), np.int64)], [np.zeros(0, np.float32)]
    band = max(1, int(_MASK_BLOCK * mds // (geom.stride * geom.downsample)))
    for g0 in range(0, rows if cols else 0, band):
        index, boxes = tile_grid(geom, rows=(g0, min(rows, g0 + band)))
        r0, r1, c0, c1 = box_pixels(boxes, (mds, mds), mask.shape)
        frac = np.empty(len(index), np.float32)
        for k0 in range(0, cols, band):
            sel = (index[:, 4] >= k0) & (index[:, 4] < k0 + band)
            lo, hi, left, right = int(r0[sel].min()), int(r1[sel].max()), int(c0[sel].min()), int(c1[sel].max())
            frac[sel] = tile_tissue_fraction(np.asarray(mask[lo:hi, left:right]), boxes[sel], (mds, mds),
                                             window=(lo, left, *mask.shape))
        keep = (frac >= threshold) & (frac > 0)
        index_parts.append(index[keep])
        frac_parts.append(frac[keep])
    return np.concatenate(index_parts), np.concatenate(frac_parts), rows * cols


@trim_after
def plan_slide(slide_path: str, out: str, cfg: TileConfig) -> dict[str, Any]:
    """Worker task: tissue mask, tile grid and an empty store.  Returns sizes, not pixels.

    A user-facing problem (bad slide, impossible request) comes back as ``{"error": ...}``
    rather than as an exception, so workers do not log tracebacks for user mistakes.
    """
    try:
        return _plan_slide(slide_path, out, cfg)
    except HpcpathError as exc:
        return {"error": exc.message}


def _plan_slide(slide_path: str, out: str, cfg: TileConfig) -> dict[str, Any]:
    from hpcpath.codecs import array_codecs, passthrough_codecs

    t0 = time.perf_counter()
    keep_large_buffers()
    spath = store_path(out, slide_id_for(slide_path))
    remove_store(spath)  # anything here is partial or stale: start clean
    slide = open_slide(slide_path, cfg.reader, cached=True)
    info = slide.info
    geom = tile_geometry(info, cfg)

    # Tissue mask at ~mask_mpp microns per pixel (or a fixed downsample without MPP).
    mpp0 = info.mpp[0] if info.mpp else cfg.default_mpp
    mds = max(1.0, cfg.mask_mpp / mpp0) if mpp0 else cfg.mask_downsample
    w0, h0 = info.dimensions
    mw, mh = max(1, math.ceil(w0 / mds)), max(1, math.ceil(h0 / mds))
    # Block by block through two arrays on disk (hpcpath.tissue.threshold_blocked), so memory
    # stays flat in slide size; the mask is copied into the store when it is created.
    spath.parent.mkdir(parents=True, exist_ok=True)
    scratch = None
    mask: Any  # an in-memory array, or a MaskScratch file read a window at a time
    work: Any
    read = _channel_reader(slide, mds, cfg.tissue_method)
    if mh * mw <= _MASK_WHOLE_BLOCKS * _MASK_BLOCK**2:  # small: in memory as one block, ~2x faster
        mask, work = np.zeros((mh, mw), np.uint8), np.zeros((mh, mw), np.uint8)
        channel = np.empty((mh, mw), np.uint8)
        for r0, r1, c0, c1 in _blocks((mh, mw), _MASK_BLOCK):  # read as the blocked path reads: the same mask
            channel[r0:r1, c0:c1] = read(r0, c0, r1 - r0, c1 - c0)
        read, block = (lambda r0, c0, h, w: channel[r0 : r0 + h, c0 : c0 + w]), max(mh, mw)
    else:
        scratch = tempfile.TemporaryDirectory(prefix=".hpcpath-mask-", dir=spath.parent)
        mask, work = mask_scratch(scratch.name, "mask", (mh, mw)), mask_scratch(scratch.name, "work", (mh, mw))
        block = _MASK_BLOCK
    threshold = threshold_blocked(read, (mh, mw), work, mask, method=cfg.tissue_method, block=block)

    # Nothing to tile is not a crash: the store is still made (mask, pyramid, metadata,
    # zero tiles) and the reason travels back as a one-line warning.
    empty_reason = None
    index, frac, n_grid = _kept_tiles(geom, mask, mds, cfg.tissue_threshold)
    if n_grid == 0:
        w, h = geom.out_dims
        empty_reason = (
            f"slide is smaller than one tile ({w}x{h} px at level {geom.level} "
            f"< {cfg.tile_size}); store has 0 tiles"
        )
    elif len(index) == 0:
        empty_reason = (
            f"no tissue found ({cfg.tissue_method} threshold {threshold:.3g}, no tile with "
            f"tissue fraction >= {cfg.tissue_threshold}); store has 0 tiles"
        )
    n = len(index)

    # Passthrough (hpcpath.passthrough): the slide's own compressed tiles become the chunks.
    from hpcpath.passthrough import describe, qualify

    probe = None if n == 0 else (int(round(index[0, 0] / geom.level_downsample)),
                                 int(round(index[0, 1] / geom.level_downsample)))
    fmt, why = qualify(slide, geom, cfg, probe) if n else (None, "no tiles to store")
    tile_path = describe(fmt, why, cfg.codec)

    pyr_source, thumb = pyramid_source(geom, cfg, fmt is not None)
    meta = StoreMeta(
        slide=info,
        params_key=cfg.params_key(),
        tiling=TilingMeta(
            level=geom.level, downsample=geom.downsample, read_size=geom.read_size,
            stride=geom.stride, tile_mpp=geom.mpp, n_tiles=n, n_grid_tiles=n_grid,
            options={**cfg.model_dump(exclude={"reader", "tiles_per_task"}),
                     "tile_path": tile_path,  # passthrough or decode, and why not passthrough
                     "pyramid_source": pyr_source if cfg.pyramid else None},
        ),
        tissue=TissueMeta(cfg.tissue_method, threshold, (mds, mds)),
    )
    t = cfg.tile_size
    if fmt:  # one tile per chunk, chunk_tiles per shard file: tasks still own whole files
        layout = passthrough_codecs(fmt, max(1, min(cfg.chunk_tiles, n)), t)
    else:
        layout = {"chunks": (max(1, min(cfg.chunk_tiles, n)), t, t, 3),
                  **array_codecs(cfg.codec, jpeg_quality=cfg.jpeg_quality)}
    shapes = pyramid_shapes(info, cfg.pyramid_downsample) if cfg.pyramid else []
    create_slide_store(spath, meta, mask=mask, index=index, tissue_fraction=frac, tile_layout=layout,
                       tile_codec=f"passthrough-{fmt}" if fmt else cfg.codec, pyramid=shapes,
                       pyramid_downsample=cfg.pyramid_downsample)
    if shapes and pyr_source == "tiles" and n:  # thumbnails: chunked as the tiles, so tasks own them
        open_group(spath, "r+", "tiles").create_array(
            _THUMBS, shape=(n, thumb, thumb, 3), dtype="uint8", chunks=(layout["chunks"][0], thumb, thumb, 3),
            fill_value=0, config={"write_empty_chunks": True}, chunk_key_encoding=FLAT_CHUNK_KEYS,
            **array_codecs("blosc-lz4"))
    if scratch is not None:
        mask.close()  # the mappings, before their files go
        work.close()
        scratch.cleanup()  # (on an error, when the TemporaryDirectory is collected)
    return {
        "slide_id": info.slide_id,
        "store": str(spath),
        "n_tiles": n,
        "empty_reason": empty_reason,
        "tile_path": tile_path,
        "pyramid": shapes,
        "pyramid_source": pyr_source,
        "seconds": time.perf_counter() - t0,
    }


def _cut_tiles(slide, level: int, read: int, t: int, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Tiles at level coords (lx, ly): one strip read per run of tiles sharing a grid row."""
    from PIL import Image

    batch = np.empty((len(lx), t, t, 3), np.uint8)
    if slide.native_tile_size(level) == (read, read) == (t, t) and not (lx % t).any() and not (ly % t).any():
        for k in range(len(lx)):  # the grid is the file's tile grid: one decode per tile
            batch[k] = slide.read(level, int(lx[k]), int(ly[k]), t, t)
        return batch
    max_run = max(1, 8192 // read)  # bound a strip's width (memory)
    i = 0
    while i < len(lx):
        j = i + 1
        while j < len(lx) and ly[j] == ly[i] and j - i < max_run and 0 <= lx[j] - lx[j - 1] <= read:
            j += 1
        x_start, width = int(lx[i]), int(lx[j - 1] - lx[i] + read)
        strip = slide.read(level, x_start, int(ly[i]), width, read)
        for k in range(i, j):
            off = int(lx[k] - x_start)
            patch = strip[:, off : off + read]
            if read != t:
                patch = np.asarray(Image.fromarray(patch).resize((t, t), Image.Resampling.BOX))
            batch[k] = patch
        i = j
    return batch


def write_tiles(slide_path: str, store: str, cfg: TileConfig, start: int, stop: int) -> int:
    """Worker task: read tiles [start, stop) from the slide and write their chunks.

    Chunk k is compressed and written on a helper thread while chunk k+1 is decoded (both
    release the GIL), with at most one write in flight so memory stays at two chunks.
    """
    from concurrent.futures import ThreadPoolExecutor

    keep_large_buffers()
    st = open_store(store, require_complete=False, mode="r+")
    images = st.tiles
    meta = st.metadata
    level, read = meta.tiling.level, meta.tiling.read_size
    lds = meta.slide.level_downsamples[level]
    index = np.asarray(st.root["tiles/index"][start:stop])
    slide = open_slide(slide_path, cfg.reader, cached=True)
    tile_path = meta.tiling.options.get("tile_path") or {}
    if tile_path.get("kind") == "passthrough":
        return _write_passthrough(slide, store, images, index, level, lds, tile_path["format"], start)
    chunk = images.chunks[0]
    # the pyramid's base from these decoded tiles (pyramid_source): box-averaged on the writer thread
    thumbs = st.root[f"tiles/{_THUMBS}"] if meta.tiling.options.get("pyramid_source") == "tiles" else None

    direct = _chunk_writer(images)

    direct_thumbs = None if thumbs is None else _chunk_writer(thumbs)

    def put(sel: slice, batch: np.ndarray) -> None:
        n = sel.stop - sel.start
        if n < chunk:  # whole chunks: tasks start on chunk boundaries, the array's last one is padded
            batch = np.concatenate([batch, np.zeros((chunk - n, *batch.shape[1:]), np.uint8)])
        if direct is None:
            images[sel] = batch[:n]
        else:
            direct((sel.start // chunk, 0, 0, 0), batch)
        if thumbs is not None:
            small = thumbnails(batch, cfg.tile_size // thumbs.shape[1])
            if direct_thumbs is None:
                thumbs[sel] = small[:n]
            else:
                direct_thumbs((sel.start // chunk, 0, 0, 0), small)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcpath-write") as pool:
        pending = None
        for c0 in range(0, len(index), chunk):
            sub = index[c0 : c0 + chunk]
            lx = np.round(sub[:, 0] / lds).astype(np.int64)
            ly = np.round(sub[:, 1] / lds).astype(np.int64)
            batch = _cut_tiles(slide, level, read, cfg.tile_size, lx, ly)
            if pending is not None:
                pending.result()
            sel = slice(start + c0, start + c0 + len(sub))
            pending = pool.submit(put, sel, batch)
        if pending is not None:
            pending.result()
    return stop - start


def _write_passthrough(slide, store: str, images, index: np.ndarray, level: int, lds: float,
                       fmt: str, start: int) -> int:
    """Tiles [start, start + len(index)) as the slide's stored tile bytes, never decoded:
    one shard file per ``images.shards[0]`` tiles, the tiles' bodies copied from the slide
    file by the kernel (:func:`hpcpath.passthrough.write_shard_parts`)."""
    from hpcpath.passthrough import NativeChunks, blank_chunk, write_shard_parts

    per = images.shards[0]
    if start % per:
        raise HpcpathError(f"task start {start} is not on a shard boundary ({per} tiles)", store)
    if slide.native_page(level) is None:
        raise SlideError(f"level {level} is no longer readable tile by tile", slide.path)
    base = os.path.join(store, images.path)
    t = images.shape[1]
    blank = None
    lxy = np.round(index[:, :2] / lds).astype(np.int64).tolist()
    folders: set[str] = set()
    src = os.open(slide.path, os.O_RDONLY)
    try:
        tiles = NativeChunks(slide, src, fmt, level)
        for c0 in range(0, len(index), per):
            parts: list = []
            for lx, ly in lxy[c0 : c0 + per]:
                part = tiles.get(lx, ly)
                if part is None:  # sparse in the file: OpenSlide shows the background colour
                    part = blank = blank or blank_chunk(fmt, t, slide.background)
                parts.append(part)
            path = os.path.join(base, images.metadata.encode_chunk_key(((start + c0) // per, 0, 0, 0)))
            folder = os.path.dirname(path)
            try:
                write_shard_parts(path, parts, per, src, folder_exists=folder in folders)
                folders.add(folder)
            except EOFError as exc:
                raise SlideError(f"cannot read level {level}: {exc}", slide.path) from None
    finally:
        os.close(src)
    return len(index)


def _kept_footprints(index: np.ndarray, side: float, d: float, r0: int, r1: int, c0: int,
                     c1: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``index`` whose tiles reach into the base block [r0:r1, c0:c1], and their
    footprints there in base pixels (x0, y0, x1, y1), unclipped."""
    x0, y0 = index[:, 0] / d, index[:, 1] / d
    box = np.stack([x0, y0, x0 + side / d, y0 + side / d], 1).round().astype(np.int64)
    sel = np.nonzero((box[:, 2] > c0) & (box[:, 0] < c1) & (box[:, 3] > r0) & (box[:, 1] < r1))[0]
    return sel, box[sel]


def _paste(block: np.ndarray, r0: int, c0: int, box, pixels: np.ndarray) -> None:
    """Put (h, w, 3) ``pixels`` whose base-pixel box is ``box`` into the (3, H, W) block at
    (r0, c0), clipped to the block."""
    x0, y0, x1, y1 = (int(v) for v in box)
    _, bh, bw = block.shape
    a, b = max(y0, r0), min(y1, r0 + bh)
    e, f = max(x0, c0), min(x1, c0 + bw)
    if a < b and e < f:
        block[:, a - r0 : b - r0, e - c0 : f - c0] = np.moveaxis(pixels[a - y0 : b - y0, e - x0 : f - x0], -1, 0)


def _filled(shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """A (3, h, w) uint8 image of one colour, a plane at a time (a memset each)."""
    out = np.empty((len(colour), *shape), np.uint8)
    for i, v in enumerate(colour):
        out[i].fill(v)
    return out


def _paste_thumbs(shape: tuple[int, int], bg: np.ndarray, r0: int, c0: int, boxes: np.ndarray,
                  thumbs: np.ndarray) -> np.ndarray:
    """A (3, h, w) block at (r0, c0) of the background colour with the (n, s, s, 3)
    thumbnails in it.  When they lie on a grid of their own size from the block's corner
    (the usual case), in one assignment through a (rows, cols, 3, s, s) view of a block
    padded to that grid."""
    s = thumbs.shape[1]
    h, w = shape
    gy, gx = boxes[:, 1] - r0, boxes[:, 0] - c0
    if not (gy % s).any() and not (gx % s).any() and gy.min() >= 0 and gx.min() >= 0:
        hp, wp = -(-max(h, int(gy.max()) + s) // s) * s, -(-max(w, int(gx.max()) + s) // s) * s
        grid = _filled((hp, wp), bg)
        cells = grid.reshape(3, hp // s, s, wp // s, s).transpose(1, 3, 0, 2, 4)
        cells[gy // s, gx // s] = thumbs.transpose(0, 3, 1, 2)
        return grid[:, :h, :w]
    block = _filled((h, w), bg)
    for box, t in zip(boxes, thumbs):
        _paste(block, r0, c0, box, t)
    return block


@dataclass
class _PyramidTask:
    """What a pyramid task's blocks share, opened once a task: the store's levels and their
    chunk writers, the tile index, the slide handle and where the kept tiles' pixels come from."""

    levels: list
    puts: list
    index: np.ndarray
    side: float
    d: float
    bg: np.ndarray
    slide: Any
    thumbs: Any  # tiles/.thumbs (decode path), else None: read from the slide

    @classmethod
    def open(cls, slide_path: str, store: str, cfg: TileConfig, n_levels: int) -> _PyramidTask:
        st = open_store(store, require_complete=False, mode="r+")
        levels = st.pyramid
        meta = st.metadata
        slide = open_slide(slide_path, cfg.reader, cached=True)
        n = meta.tiling.n_tiles
        index = np.asarray(st.root["tiles/index"][:]) if n else np.zeros((0, 5), np.int64)
        from_tiles = meta.tiling.options.get("pyramid_source") == "tiles" and n
        return cls(levels, [_chunk_writer(a) for a in levels[:n_levels]], index,
                   meta.tiling.tile_size * meta.tiling.downsample, cfg.pyramid_downsample,
                   slide.background, slide, st.root[f"tiles/{_THUMBS}"] if from_tiles else None)

    def thumbs_of(self, rows: np.ndarray) -> np.ndarray:
        """The thumbnails of tiles ``rows`` (ascending), read a chunk at a time: a block's
        rows span whole grid rows of the index, and reading ``[rows.min():rows.max()]``
        decoded every kept tile of those rows across the slide (~50 MB a block at 100k)."""
        arr = self.thumbs
        ch = arr.chunks[0]
        out = np.empty((len(rows), *arr.shape[1:]), np.uint8)
        get = _chunk_reader(arr)
        for c in np.unique(rows // ch):
            sel = np.flatnonzero(rows // ch == c)
            chunk = get((int(c), 0, 0, 0)) if get is not None else None
            if chunk is None:  # another codec layout, or never written (zeros: zarr's fill)
                chunk = np.asarray(arr[int(c) * ch : (int(c) + 1) * ch])
            out[sel] = chunk[rows[sel] - int(c) * ch]
        return out

    def block(self, r0: int, c0: int, n_levels: int) -> None:
        """The base block at (r0, c0) (``_PYRAMID_BLOCK`` px a side) and its share of the next
        ``n_levels - 1`` levels (2x2 means), which it covers in whole chunks.

        The pyramid shows the kept tiles: each one's footprint from its thumbnail (decode
        path, written by ``write_tiles``; this task runs after them) or read from the slide's
        best level for the pyramid's scale (``pyramid_source``); everything else is the
        slide's background colour.  A block with no kept tile on a white-background slide
        writes nothing (its chunks read as the arrays' fill value, white)."""
        _, h, w = self.levels[0].shape
        r1, c1 = min(h, r0 + _PYRAMID_BLOCK), min(w, c0 + _PYRAMID_BLOCK)
        d, side, bg, index = self.d, self.side, self.bg, self.index
        # the index is row-major (y ascending): footprints of the rows whose tiles can reach
        # the block's rows only, so a block costs its own tiles, not the slide's (51k at 100k)
        lo, hi = (int(v) for v in np.searchsorted(index[:, 1], [(r0 - 1) * d - side, (r1 + 1) * d]))
        rows, boxes = _kept_footprints(index[lo:hi], side, d, r0, r1, c0, c1)
        rows += lo
        if not len(rows) and (bg == 255).all():
            return
        if self.thumbs is not None and len(rows):
            block = _paste_thumbs((r1 - r0, c1 - c0), bg, r0, c0, boxes, self.thumbs_of(rows))
        else:
            block = _filled((r1 - r0, c1 - c0), bg)
            i = 0
            while i < len(rows):  # one read per run of adjacent tiles in a grid row
                j = i + 1
                while j < len(rows) and boxes[j, 1] == boxes[i, 1] and boxes[j, 0] <= boxes[j - 1, 2]:
                    j += 1
                x0, y0 = max(int(boxes[i, 0]), c0), max(int(boxes[i, 1]), r0)
                x1, y1 = min(int(boxes[i:j, 2].max()), c1), min(int(boxes[i, 3]), r1)
                px = self.slide.read_scaled(x0 * d, y0 * d, x1 - x0, y1 - y0, d)
                _paste(block, r0, c0, (x0, y0, x1, y1), px)
                i = j
            # the decoded tiles these reads shared (a block's own) are of no use to the next
            # block: a worker's cached handle kept up to 256 (~50 MB) from block to block
            self.slide.clear_cache()
        # chunks no kept tile reaches hold only the background: left unwritten when it is
        # the arrays' fill value (white), so neither compared nor encoded
        drawn = boxes - [c0, r0, c0, r0] if (bg == 255).all() else None
        for k in range(n_levels):
            if k:
                block = _half(block)
                r0, c0 = r0 // 2, c0 // 2
                drawn = None if drawn is None else drawn // 2 + [0, 0, 1, 1]
            _, lh, lw = self.levels[k].shape
            _write_chunks(self.levels[k], r0, c0, block[:, : lh - r0, : lw - c0], drawn, self.puts[k])


def write_pyramid_blocks(slide_path: str, store: str, cfg: TileConfig, blocks: tuple[tuple[int, int], ...],
                         n_levels: int, *_deps: Any) -> int:
    """Worker task: :meth:`_PyramidTask.block` for each (r0, c0) of ``blocks`` in turn, the
    store and slide opened once: a few blocks a task, so a small slide's pyramid costs a few
    scheduler round trips, not one a block, and a big one a store open per four blocks."""
    keep_large_buffers()
    task = _PyramidTask.open(slide_path, store, cfg, n_levels)
    for r0, c0 in blocks:
        task.block(r0, c0, n_levels)
    return len(blocks)


def _chunk_writer(arr) -> Callable[[tuple[int, ...], np.ndarray], None] | None:
    """``put(coords, chunk)``: write one whole chunk (the full chunk shape, edge chunks padded
    with the fill value, as zarr stores them) of a Blosc-compressed array as one file renamed
    into place, encoded with the array's own Blosc settings; None for any other codec layout.

    A third to a half of zarr's ``__setitem__`` time for the same bytes (zarr 3 routes every
    write through its event loop and copies the selection into a fresh chunk buffer):
    ~10 ms instead of ~22 ms per 64-tile chunk on the development VM."""
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec

    from hpcpath.passthrough import write_shard

    codecs = arr.metadata.codecs
    if not (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
            and arr.metadata.chunk_key_encoding.name == "default" and arr.dtype == np.uint8):
        return None
    bc = codecs[1]
    enc = numcodecs.Blosc(cname=bc.cname.value, clevel=bc.clevel, shuffle=int(bc.shuffle != "noshuffle"),
                          blocksize=bc.blocksize)
    base = os.path.join(str(arr.store_path.store.root), arr.path)

    def put(coords: tuple[int, ...], chunk: np.ndarray) -> None:
        write_shard(os.path.join(base, arr.metadata.encode_chunk_key(coords)), enc.encode(np.ascontiguousarray(chunk)))

    return put


def _write_chunks(arr, r0: int, c0: int, block: np.ndarray, drawn: np.ndarray | None = None,
                  put: Callable[[tuple[int, ...], np.ndarray], None] | None = None) -> None:
    """``arr[:, r0:, c0:] = block`` for a (3, h, w) block made of whole chunks of a pyramid
    array, through ``put`` (:func:`_chunk_writer`, made here when not given) where it can.
    Chunks all of the fill value are skipped (as zarr does without ``write_empty_chunks``):
    those that no box of ``drawn`` (x0, y0, x1, y1 in block pixels) reaches, when given."""
    put = put or _chunk_writer(arr)
    if put is None:
        arr[:, r0 : r0 + block.shape[1], c0 : c0 + block.shape[2]] = block
        return
    _, ch, cw = arr.chunks
    fill = arr.fill_value
    for a in range(0, block.shape[1], ch):
        for b in range(0, block.shape[2], cw):
            part = block[:, a : a + ch, b : b + cw]
            if drawn is not None:
                if not ((drawn[:, 2] > b) & (drawn[:, 0] < b + cw) & (drawn[:, 3] > a) & (drawn[:, 1] < a + ch)).any():
                    continue
            elif (part == fill).all():
                continue
            if part.shape[1:] == (ch, cw):
                chunk = np.ascontiguousarray(part)
            else:  # an edge chunk, padded with the fill value as zarr stores it
                chunk = np.full((3, ch, cw), fill, np.uint8)
                chunk[:, : part.shape[1], : part.shape[2]] = part
            put((0, (r0 + a) // ch, (c0 + b) // cw), chunk)


def _chunk_reader(arr) -> Callable[[tuple[int, ...]], np.ndarray | None] | None:
    """``get(coords)``: one whole chunk of a Blosc-compressed uint8 array (the layout
    :func:`_chunk_writer` writes) read and decoded on the calling thread, None where no chunk
    was written (the fill value); None for any other codec layout.

    zarr's reads decode on its own threads: each leaves its freed buffers in a malloc arena
    of its own, and the upper-levels task's RSS grew with the chunks it read (+95 MB at 100k)."""
    import numcodecs

    if _chunk_writer(arr) is None:
        return None
    dec = numcodecs.Blosc()
    base = os.path.join(str(arr.store_path.store.root), arr.path)

    def get(coords: tuple[int, ...]) -> np.ndarray | None:
        try:
            with open(os.path.join(base, arr.metadata.encode_chunk_key(coords)), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        return np.frombuffer(dec.decode(raw), np.uint8).reshape(arr.chunks)

    return get


def _read_block(arr, get, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``arr[:, r0:r1, c0:c1]`` of a (3, h, w) array, chunk by chunk through ``get``
    (:func:`_chunk_reader`)."""
    _, ch, cw = arr.chunks
    out = _filled((r1 - r0, c1 - c0), np.full(3, arr.fill_value, np.uint8))
    for a in range(r0 // ch, -(-r1 // ch)):
        for b in range(c0 // cw, -(-c1 // cw)):
            chunk = get((0, a, b))
            if chunk is None:
                continue
            y0, y1, x0, x1 = max(r0, a * ch), min(r1, (a + 1) * ch), max(c0, b * cw), min(c1, (b + 1) * cw)
            part = chunk[:, y0 - a * ch : y1 - a * ch, x0 - b * cw : x1 - b * cw]
            out[:, y0 - r0 : y1 - r0, x0 - c0 : x1 - c0] = part
    return out


@trim_after
def write_pyramid_levels(store: str, first: int = 1, *_deps: Any) -> int:
    """Worker task: pyramid levels ``first``.. from the level below by 2x2 means, chunk by
    chunk (the levels no single base block covers in whole chunks: big slides only).
    Chunks are read, decoded, encoded and written on this thread (:func:`_chunk_reader`,
    :func:`_write_chunks`), so its memory does not grow with the number of chunks."""
    keep_large_buffers()
    levels = pyramid_levels(open_group(store, "r+", "image"))
    n = len(levels)
    step = _PYRAMID_CHUNK
    for level in range(first, n):
        src, dst = levels[level - 1], levels[level]
        get, put = _chunk_reader(src), _chunk_writer(dst)
        _, h, w = dst.shape
        _, sh, sw = src.shape
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            for c0 in range(0, w, step):
                c1 = min(w, c0 + step)
                if get is None:
                    block = np.asarray(src[:, 2 * r0 : 2 * r1, 2 * c0 : 2 * c1])
                    dst[:, r0:r1, c0:c1] = _half(block)[:, : r1 - r0, : c1 - c0]
                    continue
                block = _read_block(src, get, 2 * r0, min(sh, 2 * r1), 2 * c0, min(sw, 2 * c1))
                _write_chunks(dst, r0, c0, _half(block)[:, : r1 - r0, : c1 - c0], put=put)
                del block  # not alive while the next one is read: the task's peak is one block
    return n


def finalize_store(store: str, n_tiles: int, written: int) -> None:
    """Mark the store complete — the last write, and only when every tile is accounted for."""
    if written != n_tiles:
        raise HpcpathError(f"wrote {written} of {n_tiles} tiles; not marking complete", store)
    for tmp in Path(store).glob("tiles/**/*.tmp"):  # a shard write killed (and retried) midway
        tmp.unlink(missing_ok=True)
    shutil.rmtree(Path(store) / "tiles" / _THUMBS, ignore_errors=True)  # the pyramid is built
    mark_complete(store)


# ----------------------------------------------------------------------------- driver
@dataclass
class RunResult:
    out_dir: Path
    records: list[SlideRecord]
    manifest_path: Path

    @property
    def failed(self) -> list[SlideRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def empty(self) -> list[SlideRecord]:
        return [r for r in self.records if r.status == "empty"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def n_tiles(self) -> int:
        return sum(r.tiles or 0 for r in self.records)


def slide_units(cfg: TileConfig, path: Path, plan: dict, key: str) -> list[Unit]:
    """Tile-writing and pyramid units for one planned slide (plain data: a backend runs them).

    Every unit writes whole chunks no other unit touches.  Pyramid blocks built from the
    tiles' thumbnails wait for the tile units; levels no block covers in whole chunks wait
    for every block.  Only the top unit of the pyramid counts as ``pyramid``."""
    store = plan["store"]
    units = [Unit(write_tiles, (str(path), store, cfg, a, b), "tiles", ("tile", a, key), retries=2)
             for a, b in task_ranges(plan["n_tiles"], cfg.tiles_per_task)]
    if plan["pyramid"]:
        shapes = [tuple(x) for x in plan["pyramid"]]
        blocks, owned = pyramid_blocks(shapes)
        upper = owned < len(shapes)
        tiles = tuple(range(len(units))) if plan.get("pyramid_source") == "tiles" else ()
        first = len(units)
        kind = "pyramid-base" if upper else "pyramid"
        groups = [tuple(blocks[i : i + _PYRAMID_BLOCKS_PER_TASK])
                  for i in range(0, len(blocks), _PYRAMID_BLOCKS_PER_TASK)]
        units += [Unit(write_pyramid_blocks, (str(path), store, cfg, g, owned), kind,
                       ("pyramid-base", *g[0], key), after=tiles, retries=2) for g in groups]
        if upper:
            units.append(Unit(write_pyramid_levels, (store, owned), "pyramid", ("pyramid", key),
                              after=tuple(range(first, len(units))), retries=2))
    return units


def tile_slides(
    inputs: list[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: TileConfig | None = None,
    *,
    client=None,
    on_event: Callable[[str, dict], None] | None = None,
) -> RunResult:
    """Tile every slide in ``inputs`` into ``out_dir/<slide_id>.zarr`` on a Dask client.

    Complete stores made with the same options are skipped; partial ones are redone.  One
    bad slide is recorded as failed in the manifest and never stops the others.
    ``on_event(kind, info)`` receives progress events (the CLI draws its progress line).
    ``client``: where it runs (a backend, Dask client or SparkSession; default: the current
    Dask client; :func:`hpcpath.backends.as_backend`).
    """
    from hpcpath.stage import as_backend

    cfg = cfg or TileConfig()
    backend = as_backend(client)
    out = Path(out_dir)
    check_output_dir(out)
    with run_lock(out, "hpcpath tile"):  # a second run on OUT is refused, never interleaved
        emit = on_event or (lambda kind, info: None)
        manifest = Manifest.load(out)
        paths = discover_slides(inputs)
        dups = duplicate_ids(paths)
        key = cfg.params_key()
        records: list[SlideRecord] = []
        sources: dict[str, Path] = {}

        unsaved: list[OutputError] = []  # a manifest that cannot be written (disk full,
        # read-only folder) never hides the other slides' lines: raised after the run

        def record(rec: SlideRecord) -> None:
            if not cfg.record_paths:  # privacy: the folders a slide sits in stay out of outputs
                rec.source = Path(rec.source).name
            records.append(rec)
            manifest.update(rec)
            emit("slide", {"record": rec})
            try:
                manifest.save()
                unsaved.clear()
            except OutputError as exc:
                unsaved[:] = [exc]

        plans: dict[str, tuple[Callable, tuple]] = {}
        for p in paths:
            sid = slide_id_for(p)
            if sid.casefold() in dups:
                record(SlideRecord.failure(sid, p, f"slide id {sid!r} is shared by "
                                                   f"{len(dups[sid.casefold()])} inputs"))
                continue
            if is_complete(store_path(out, sid), key):
                prev = manifest.slides.get(sid)
                tiles = prev.tiles if prev else None
                status = prev.status if prev and prev.status == "empty" else "complete"
                record(SlideRecord(sid, str(p), status, tiles, 0.0, prev.error if prev else None, key, reused=True))
                continue
            sources[sid] = p
            plans[sid] = (plan_slide, (str(p), str(out), cfg))
        emit("start", {"slides": len(paths), "submitted": len(plans)})

        def expand(sid: str, plan: dict) -> list:
            emit("plan", {"slide_id": sid, "n_tiles": plan["n_tiles"]})
            return slide_units(cfg, sources[sid], plan, key)

        def finish(sid: str, o) -> None:
            p = sources[sid]
            if o.error is None:
                try:
                    finalize_store(o.plan["store"], o.plan["n_tiles"], o.sums.get("tiles", 0))
                except Exception as exc:  # noqa: BLE001
                    o.error = one_line(exc)
            if o.error is not None:
                record(SlideRecord.failure(sid, p, o.error, o.seconds))
            elif o.plan.get("empty_reason"):
                record(SlideRecord(sid, str(p), "empty", 0, o.seconds, o.plan["empty_reason"], key))
            else:
                record(SlideRecord(sid, str(p), "complete", o.plan["n_tiles"], o.seconds, None, key))

        def on_task(sid: str, kind: str, n: int) -> None:
            if kind == "tiles":
                emit("tiles", {"slide_id": sid, "n": n})

        run_per_slide(backend, plans, expand, finish, stage="tile", key=key, label=str(out), on_task=on_task)
        if unsaved:
            raise unsaved[0]
        return RunResult(out, records, manifest.path)

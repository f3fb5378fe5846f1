"""Passthrough tiles: the slide's own compressed tiles become the store's chunks, unchanged.

A JPEG slide re-encoded into a store pays a decode and an encode per tile and stores 7-9x
the source's bytes under Blosc-lz4 (docs/benchmarks.md).  When hpcpath's tile grid *is* the
slide's tile grid, the stored tile bytes are already what a chunk needs: they are copied
byte for byte (no decode, no re-encode, no generation loss), one tile per chunk inside Zarr
v3 shards of ``chunk_tiles`` tiles (one file per shard, as many files as an ordinary store).

A slide level qualifies when all of these hold (``qualify`` checks them in this order and
records the first that fails as the reason the store was made by decoding):

1. ``passthrough: auto`` (``never`` always decodes);
2. tiles are taken at a native pyramid level with no resampling (``--level``, or an
   ``--mpp`` within 1% of a level's own);
3. ``overlap`` is 0 -- overlapping tiles share pixels, native tiles do not;
4. the level is a tiled TIFF page hpcpath reads directly (Aperio SVS, generic tiled TIFF;
   not NDPI, MRXS, DICOM or stripped pages, whose stored units are not square tiles);
5. its tiles are baseline JPEG (TIFF compression 7) with 3 samples of 8 bits, photometric
   RGB or YCbCr; or JPEG 2000 with RGB components (Aperio 33005).  Aperio's YCbCr J2K (33003)
   falls back: its codestream holds YCbCr that the TIFF reader converts after decoding, so
   a standalone decoder would return the wrong colours;
6. the native tile is square and ``tile_size`` on a side; then hpcpath's grid (origin 0,
   stride ``tile_size``) is the native grid, tile for tile (partial edge tiles are dropped
   by both);
7. a probe: the slide's first kept tile, made standalone, decodes to exactly the pixels of
   the TIFF reader (the same pixels as OpenSlide's ``read_region``; tests/test_io.py).

Standalone JPEG: TIFF JPEG tiles are "abbreviated" streams whose quantisation and Huffman
tables sit once in the page's JPEGTables tag (347); they are merged into every chunk.  And a
JPEG stream without a JFIF or Adobe marker is taken for YCbCr by every decoder, while
Aperio writes photometric-RGB tiles whose samples are RGB (no colour transform): an Adobe
APP14 marker saying which (transform 0 = RGB, 1 = YCbCr, from the TIFF photometric) is added
to streams that carry none, so any JPEG decoder (libjpeg, PIL, ``tf.io.decode_jpeg``, a
browser) shows the pixels OpenSlide shows.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["qualify", "standalone_jpeg", "shard_bytes", "write_shard", "decode_tile", "FORMATS"]

JPEG, JPEG2K_RGB, JPEG2K_YCBCR = 7, 33005, 33003
FORMATS = {JPEG: "jpeg", JPEG2K_RGB: "jpeg2k"}
_RGB, _YCBCR = 2, 6
_MAX = 2**64 - 1
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


def _has_marker(stream: bytes, marker: int, tag: bytes) -> bool:
    """Whether the header of a JPEG stream (before its first SOS) has an APPn ``marker``
    segment starting with ``tag``."""
    i = 2
    while i + 4 <= len(stream):
        if stream[i] != 0xFF:
            return False
        m = stream[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA:  # SOS: header over
            return False
        n = int.from_bytes(stream[i + 2 : i + 4], "big")
        if m == marker and stream[i + 4 : i + 4 + len(tag)] == tag:
            return True
        i += 2 + n
    return False


def _adobe(transform: int) -> bytes:
    """APP14 "Adobe" segment: DCTEncodeVersion 100, flags 0, colour ``transform``."""
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


def standalone_jpeg(tables: bytes | None, tile: bytes, photometric: int) -> bytes:
    """A TIFF JPEG tile as a complete JPEG file: the page's tables merged in, and an Adobe
    marker naming the colour space when the stream has neither it nor JFIF's."""
    if not tile.startswith(_SOI):
        raise ValueError("not a JPEG stream (no SOI marker)")
    body = tile[2:]
    if tables and len(tables) > 4:
        if not (tables.startswith(_SOI) and tables.endswith(_EOI)):
            raise ValueError("JPEGTables is not a tables-only JPEG stream")
        body = tables[2:-2] + body
    stream = _SOI + body
    if not _has_marker(stream, 0xEE, b"Adobe") and not _has_marker(stream, 0xE0, b"JFIF\x00"):
        stream = _SOI + _adobe(0 if photometric == _RGB else 1) + body
    return stream


def decode_tile(fmt: str, data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """One standalone tile chunk -> (T, T, 3) uint8 (into ``out`` when given)."""
    import imagecodecs

    if fmt == "jpeg":
        return imagecodecs.jpeg8_decode(data, out=out)
    return imagecodecs.jpeg2k_decode(data, out=out)


def qualify(slide, geom, cfg, probe: tuple[int, int] | None) -> tuple[str | None, str]:
    """(format, why) for tiling ``slide`` at ``geom`` by passthrough: format ``"jpeg"`` or
    ``"jpeg2k"`` when it qualifies, else None and the first rule (module docstring) that
    fails.  ``probe``: level coordinates of one kept tile to check decoding on, or None."""
    if cfg.passthrough == "never":
        return None, "--passthrough never"
    t = cfg.tile_size
    if geom.read_size != t or abs(geom.downsample - geom.level_downsample) > 1e-6 * geom.downsample:
        return None, f"tiles are resampled (target MPP {geom.mpp}), not native level pixels"
    if cfg.overlap:
        return None, f"overlap {cfg.overlap}: neighbouring tiles share pixels, native tiles do not"
    page = slide.native_page(geom.level)
    if page is None:
        return None, (f"level {geom.level} is not a tiled TIFF page read directly "
                      f"({slide.info.vendor} slide)")
    comp = int(page.compression)
    if comp == JPEG2K_YCBCR:
        return None, "JPEG 2000 with YCbCr components (Aperio 33003): a standalone decoder would return YCbCr"
    if comp not in FORMATS:
        return None, f"native tiles are {getattr(page.compression, 'name', comp)}-compressed, not JPEG or JPEG 2000"
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != 1:
        return None, f"native tiles have {page.samplesperpixel} samples of {page.bitspersample} bits"
    if comp == JPEG and int(page.photometric) not in (_RGB, _YCBCR):
        return None, f"JPEG tiles with photometric {getattr(page.photometric, 'name', page.photometric)}"
    if (page.tilewidth, page.tilelength) != (t, t):
        return None, f"native tiles are {page.tilewidth}x{page.tilelength}, the tile grid {t}x{t}"
    fmt = FORMATS[comp]
    if probe is not None:
        lx, ly = probe
        raw = native_tile(slide, geom.level, lx, ly)
        if raw is None:
            return None, "the probe tile is empty in the file (sparse tile)"
        try:
            got = decode_tile(fmt, chunk_bytes(fmt, page, raw))
        except Exception as exc:  # noqa: BLE001
            return None, f"a standalone native tile does not decode ({exc})"
        if got.shape != (t, t, 3) or not np.array_equal(got, slide.read(geom.level, lx, ly, t, t)):
            return None, "a standalone native tile decodes to other pixels than the TIFF reader's"
    return fmt, ""


def native_tile(slide, level: int, lx: int, ly: int) -> bytes | None:
    """Stored bytes of the native tile whose top-left is at level coordinates (lx, ly);
    None for a sparse (never written) tile."""
    page = slide.native_page(level)
    tw, th = page.tilewidth, page.tilelength
    if lx % tw or ly % th:
        raise ValueError(f"({lx}, {ly}) is not on the native {tw}x{th} tile grid")
    index = (ly // th) * -(-page.imagewidth // tw) + lx // tw
    if not page.databytecounts[index]:
        return None
    return slide.raw_tile(level, index)


def chunk_bytes(fmt: str, page, raw: bytes) -> bytes:
    """A stored tile as the chunk a reader decodes on its own."""
    if fmt == "jpeg":
        return standalone_jpeg(page.jpegtables, raw, int(page.photometric))
    return raw


def blank_chunk(fmt: str, t: int, background: np.ndarray) -> bytes:
    """A sparse tile as OpenSlide shows it: the slide's background colour, losslessly."""
    import imagecodecs

    tile = np.empty((t, t, 3), np.uint8)
    tile[:] = background
    if fmt == "jpeg":  # a flat tile is exact at quality 100 without subsampling
        return bytes(imagecodecs.jpeg8_encode(tile, level=100, subsampling="444"))
    return bytes(imagecodecs.jpeg2k_encode(tile, level=0, codecformat="J2K"))


def shard_bytes(chunks: list[bytes], per_shard: int) -> bytes:
    """A Zarr v3 shard (index at the end, index codecs bytes + crc32c) holding ``chunks``
    in order; inner chunks past the last given are empty."""
    import google_crc32c

    index = np.full((per_shard, 2), _MAX, "<u8")
    pos = 0
    for i, c in enumerate(chunks):
        index[i] = (pos, len(c))
        pos += len(c)
    raw = index.tobytes()
    return b"".join(chunks) + raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def write_shard(path: str, data: bytes) -> None:
    """Write one shard file whole (a temporary name renamed into place): a retried task or a
    crash never leaves a torn shard."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk: give the partial file's space back (logs need it)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def describe(fmt: str | None, reason: str, codec: str) -> dict[str, Any]:
    """The store's record of how its tile array was made (``tiling.tile_path``)."""
    if fmt:
        return {"kind": "passthrough", "format": fmt, "reason": None}
    return {"kind": "decode", "format": codec, "reason": reason}

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

import errno
import os
from typing import Any

import numpy as np

__all__ = ["qualify", "standalone_jpeg", "jpeg_prefix", "write_shard", "write_shard_parts",
           "decode_tile", "FORMATS"]

JPEG, JPEG2K_RGB, JPEG2K_YCBCR = 7, 33005, 33003
FORMATS = {JPEG: "jpeg", JPEG2K_RGB: "jpeg2k"}
_RGB, _YCBCR = 2, 6
_MAX = 2**64 - 1
_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


def _scan_header(stream: bytes, marker: int = -1, tag: bytes = b"") -> tuple[bool, int | None]:
    """(found, end) for the header of a JPEG stream (its segments before the first SOS):
    whether it has an APPn ``marker`` segment starting with ``tag``, and the offset just past
    the SOS marker -- -1 where a segment does not start with FF (no header to read further),
    None where ``stream`` ends inside the header (``found`` may then be incomplete)."""
    i, found = 2, False
    while i + 4 <= len(stream):
        if stream[i] != 0xFF:
            return found, -1
        m = stream[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0xDA:  # SOS: header over
            return found, i + 2
        n = int.from_bytes(stream[i + 2 : i + 4], "big")
        found = found or (m == marker and stream[i + 4 : i + 4 + len(tag)] == tag)
        i += 2 + n
    return found, None


def _has_marker(stream: bytes, marker: int, tag: bytes) -> bool:
    """Whether the header of a JPEG stream (before its first SOS) has an APPn ``marker``
    segment starting with ``tag``."""
    return _scan_header(stream, marker, tag)[0]


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


def jpeg_prefix(tables: bytes | None, head: bytes, photometric: int) -> bytes | None:
    """The bytes :func:`standalone_jpeg` puts before ``tile[2:]``, from the tile's first
    bytes only (``head``); None when ``head`` ends inside the tile's header, so the caller
    reads the whole tile.  The tile's body then goes from the slide file to the shard
    without passing through this process (:func:`write_shard_parts`)."""
    if not head.startswith(_SOI):
        raise ValueError("not a JPEG stream (no SOI marker)")
    if _scan_header(_SOI + (tables[2:-2] if tables and len(tables) > 4 else b"") + head[2:])[1] is None:
        return None
    whole = standalone_jpeg(tables, head, photometric)
    return whole[: len(whole) - (len(head) - 2)]


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


def _tile_index(page, lx: int, ly: int) -> int:
    tw, th = page.tilewidth, page.tilelength
    if lx % tw or ly % th:
        raise ValueError(f"({lx}, {ly}) is not on the native {tw}x{th} tile grid")
    return (ly // th) * -(-page.imagewidth // tw) + lx // tw


def native_tile(slide, level: int, lx: int, ly: int) -> bytes | None:
    """Stored bytes of the native tile whose top-left is at level coordinates (lx, ly);
    None for a sparse (never written) tile."""
    page = slide.native_page(level)
    index = _tile_index(page, lx, ly)
    if not page.databytecounts[index]:
        return None
    return slide.raw_tile(level, index)


_HEAD = 4096  # bytes of a tile read to find its header's end (tables, markers, SOF, SOS)


class NativeChunks:
    """The chunks of one slide level's native tiles as :func:`write_shard_parts` takes
    them, for a task that copies many: ``(prefix, offset, length)`` of the slide file (only
    a tile's first bytes are read here), the whole chunk as bytes when a tile's header runs
    past them, None for a sparse tile.  Tiles of a level share their header (tables,
    markers, SOF, SOS) as a rule: a tile that starts with the last one's header gets its
    prefix without a second scan."""

    def __init__(self, slide, src_fd: int, fmt: str, level: int) -> None:
        self.slide, self.fd, self.fmt, self.level = slide, src_fd, fmt, level
        self.page = slide.native_page(level)
        self._header, self._prefix = b"\x00", b""  # matches no tile (all start with SOI)

    def get(self, lx: int, ly: int) -> bytes | tuple[bytes, int, int] | None:
        page = self.page
        index = _tile_index(page, lx, ly)
        n, offset = int(page.databytecounts[index]), int(page.dataoffsets[index])
        if not n:
            return None
        if self.fmt != "jpeg":
            return b"", offset, n
        head = os.pread(self.fd, min(n, _HEAD), offset)
        if head.startswith(self._header):
            return self._prefix, offset + 2, n - 2
        prefix = jpeg_prefix(page.jpegtables, head, int(page.photometric)) if len(head) == min(n, _HEAD) else None
        if prefix is None:  # a long header, or a short read (raw_tile says which tile, in one line)
            return chunk_bytes(self.fmt, page, self.slide.raw_tile(self.level, index))
        end = _scan_header(head)[1]  # the header up to and including FF DA: the same
        if end is not None and end > 0:  # segments before the scan in any tile that starts so
            self._header, self._prefix = head[:end], prefix
        return prefix, offset + 2, n - 2


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


def _shard_index(lengths: list[int], per_shard: int) -> bytes:
    """A Zarr v3 shard's trailing index (index codecs bytes + crc32c) for chunks of these
    byte lengths stored in order; inner chunks past the last given are empty."""
    index = np.full((per_shard, 2), _MAX, "<u8")
    pos = 0
    for i, n in enumerate(lengths):
        index[i] = (pos, n)
        pos += n
    raw = index.tobytes()
    return raw + np.uint32(_crc32c(raw)).astype("<u4").tobytes()


def write_shard(path: str, data: bytes) -> None:
    """Write one shard file whole (a temporary name renamed into place): a retried task or a
    crash never leaves a torn shard."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_whole(path, lambda fd: _pwrite_all(fd, data, 0))


def write_shard_parts(path: str, parts: list, per_shard: int, src_fd: int, *, folder_exists: bool = False) -> None:
    """:func:`write_shard` of chunks given as ``bytes`` or as ``(prefix, offset, length)``:
    ``prefix`` then ``length`` bytes of the file ``src_fd`` from ``offset``, copied by the
    kernel (``copy_file_range``: no read into and write out of this process; half the CPU
    of pread + write for a passthrough tile stage, docs/benchmarks.md).  The shard index
    (and its checksum) needs only the chunks' lengths."""
    lengths = [len(p) if isinstance(p, bytes) else len(p[0]) + p[2] for p in parts]
    tail = _shard_index(lengths, per_shard)
    if not folder_exists:
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def fill(fd: int) -> None:
        pos = 0
        for p, n in zip(parts, lengths):
            if isinstance(p, bytes):
                _pwrite_all(fd, p, pos)
            else:
                prefix, offset, length = p
                _pwrite_all(fd, prefix, pos)
                _copy_range(src_fd, offset, length, fd, pos + len(prefix))
            pos += n
        _pwrite_all(fd, tail, pos)

    _write_whole(path, fill)


def _write_whole(path: str, fill) -> None:
    """``fill(fd)`` writes a temporary file that is then renamed to ``path``; on any error
    (a full disk) the partial file is removed, giving its space back (logs need it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fill(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int(google_crc32c.value(data))


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


_KERNEL_COPY = hasattr(os, "copy_file_range")


def _copy_range(src: int, offset: int, length: int, dst: int, pos: int) -> None:
    """``length`` bytes of ``src`` at ``offset`` to ``dst`` at ``pos``: in the kernel where
    the file systems allow it, else through a buffer (EXDEV across some file systems,
    ENOSYS/EOPNOTSUPP on old kernels or network mounts: the fallback stays on for the process)."""
    global _KERNEL_COPY
    while length:
        if _KERNEL_COPY:
            try:
                n = os.copy_file_range(src, dst, length, offset, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                    raise
                _KERNEL_COPY = False
                continue
        else:
            data = os.pread(src, min(length, 1 << 24), offset)
            n = len(data)
            if n:
                _pwrite_all(dst, data, pos)
        if n == 0:  # the source ends before the tile does (a truncated slide file)
            raise EOFError(f"the file ends {length} bytes before the end of a tile")
        offset, pos, length = offset + n, pos + n, length - n


def describe(fmt: str | None, reason: str, codec: str) -> dict[str, Any]:
    """The store's record of how its tile array was made (``tiling.tile_path``)."""
    if fmt:
        return {"kind": "passthrough", "format": fmt, "reason": None}
    return {"kind": "decode", "format": codec, "reason": reason}

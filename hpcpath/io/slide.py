"""Slide access: one small interface over OpenSlide and a direct TIFF tile reader.

OpenSlide opens every format we care about (SVS, NDPI, generic TIFF, DICOM, MRXS...) and is
the general path.  For TIFF-family slides whose levels are plain tiled pages (Aperio SVS,
generic pyramidal TIFF) we can decode the native tiles ourselves with tifffile + imagecodecs:
no RGBA conversion, no cairo compositing, several times faster.  Both give the same pixels at
native positions (tests check it on the real slides); ``backend="auto"`` picks direct where it
is safe and OpenSlide elsewhere.

Only whitelisted, non-identifying properties leave this module (see ``SlideInfo``): label and
macro images and free-text header fields (Filename, User, Date...) never reach outputs.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from array import array
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from hpcpath.errors import SlideError

__all__ = ["SlideInfo", "Slide", "open_slide", "slide_id_for", "Backend"]

Backend = Literal["auto", "openslide", "direct"]

# Compressions whose tiles tifffile/imagecodecs decode to the same pixels OpenSlide shows.
_DIRECT_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005, 34712}
_DIRECT_VENDORS = {"aperio", "generic-tiff"}
_DICOM_SUFFIXES = {".dcm", ".dicom"}


@dataclass(frozen=True)
class SlideInfo:
    """What we know and may publish about a slide: geometry and acquisition, never identity."""

    slide_id: str
    source_name: str
    source_bytes: int
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None
    mpp_source: str  # "header", "objective-power" or "none"
    objective_power: float | None

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level_dimensions"] = [list(x) for x in self.level_dimensions]
        d["level_downsamples"] = list(self.level_downsamples)
        d["mpp"] = None if self.mpp is None else list(self.mpp)
        return d


def slide_id_for(path: str | os.PathLike) -> str:
    """The store name of a slide: its file stem (a DICOM series: its folder name), made safe
    to use as one file name (:func:`safe_name`)."""
    p = Path(path)
    return safe_name(p.name if p.is_dir() else p.stem)


_NAME_PUNCT = frozenset(" ._-+,=@()[]")
_NAME_MAX = 100  # UTF-8 bytes; file systems allow 255 for the whole name (".zarr", suffixes)


def safe_name(raw: str) -> str:
    """``raw`` as one safe path component: no separator, NUL, control or shell character, no
    leading dot or dash (hidden files, options), at most 100 bytes (a long name keeps a hash
    of the whole so two long names stay apart).  Compatibility forms are folded first (NFKC),
    so a full-width solidus is a separator like any other.

    >>> safe_name("../../etc/passwd"), safe_name("..") , safe_name("-rf"), safe_name("$(id)")
    ('_._.._etc_passwd', '_.', '_rf', '_(id)')
    >>> safe_name("test3-TRITC 2 (560)"), safe_name("a\uff0fb"), safe_name("")
    ('test3-TRITC 2 (560)', 'a_b', '_')
    >>> len(safe_name("x" * 300).encode()) <= 100
    True
    """
    import hashlib
    import unicodedata

    name = unicodedata.normalize("NFKC", raw)
    name = "".join(c if (c.isalnum() or c in _NAME_PUNCT) and c.isprintable() else "_" for c in name)
    if not name or name[0] in ".-":
        name = "_" + name[1:] if name else "_"
    if len(name.encode()) > _NAME_MAX:
        digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        cut = name.encode()[: _NAME_MAX - 11].decode("utf-8", "ignore")
        name = f"{cut}~{digest}"
    return name


def _resolve_openslide_path(path: Path) -> Path:
    """A DICOM series is a folder of .dcm files; OpenSlide opens it through any one of them."""
    if path.is_dir():
        dcms = sorted(p for p in path.iterdir() if p.suffix.lower() in _DICOM_SUFFIXES)
        if not dcms:
            raise SlideError("folder is not a DICOM slide series (no .dcm files)", path)
        return dcms[0]
    return path


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _mpp_from(props, objective: float | None) -> tuple[tuple[float, float] | None, str]:
    """MPP rule: header MPP if present; else 10 / objective power (20x -> 0.5); else none.

    A slide with neither can still be tiled by level; asking for a target MPP then fails with
    a clear error unless the user supplies ``default_mpp``.
    """
    try:
        mx = float(props["openslide.mpp-x"])
        my = float(props["openslide.mpp-y"])
        if mx > 0 and my > 0:
            return (mx, my), "header"
    except (KeyError, ValueError):
        pass
    if objective:
        return (10.0 / objective, 10.0 / objective), "objective-power"
    return None, "none"


def _compact_tile_tables(page) -> None:
    """tifffile keeps a page's tile offsets and byte counts as tuples of Python ints
    (~40 bytes a tile each: 12 MB for the 153k tiles of a 100k x 100k level 0, held by every
    worker's cached handle); as ``array('q')`` (a sequence of the same ints, as tifffile
    expects) they take 8.  The tag objects hold the same tuples, so their values are swapped
    too (a private attribute: on a tifffile without it the tuples simply stay)."""
    for attr, code in (("dataoffsets", 324), ("databytecounts", 325)):
        values = array("q", getattr(page, attr))
        setattr(page, attr, values)
        tag = page.tags.get(code)
        if tag is not None and hasattr(tag, "_value"):
            tag._value = values


class _DirectTiff:
    """Decode native tiles of matched TIFF pages; an LRU of decoded tiles serves neighbours."""

    def __init__(self, path: Path, level_dimensions, cache_tiles: int = 256) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._pages: dict[int, object] = {}
        tiled = [p for p in self._tif.pages if getattr(p, "is_tiled", False)]
        for level, (w, h) in enumerate(level_dimensions):
            for p in tiled:
                if (
                    (p.imagewidth, p.imagelength) == (w, h)
                    and p.compression in _DIRECT_COMPRESSIONS
                    and p.samplesperpixel in (3, 4)
                    and p.bitspersample == 8
                    and p.planarconfig == 1
                    and p.imagedepth == 1
                ):
                    self._pages[level] = p
                    _compact_tile_tables(p)
                    break
        self._cache: OrderedDict = OrderedDict()
        self._cache_tiles = cache_tiles
        self._lock = threading.Lock()

    def has_level(self, level: int) -> bool:
        return level in self._pages

    def _tile(self, page, level: int, index: int, cache: bool = True) -> np.ndarray:
        key = (level, index)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        nbytes = page.databytecounts[index]
        if nbytes == 0:  # sparse tile: OpenSlide paints these transparent -> white
            tile = np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        else:
            data = os.pread(self._fd, nbytes, page.dataoffsets[index])
            arr, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = arr[0, :, :, :3]
        if not cache:
            return tile
        with self._lock:
            self._cache[key] = tile
            if len(self._cache) > self._cache_tiles:
                self._cache.popitem(last=False)
        return tile

    def tile_size(self, level: int) -> tuple[int, int]:
        page = self._pages[level]
        return page.tilewidth, page.tilelength

    def page(self, level: int):
        """The tifffile page behind ``level`` (compression, tables, offsets)."""
        return self._pages[level]

    def raw(self, level: int, index: int) -> bytes:
        """Tile ``index`` of ``level`` as stored in the file: compressed, not decoded."""
        page = self._pages[level]
        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        if len(data) != page.databytecounts[index]:  # pread stops short at a truncated file's end
            raise OSError(f"file ends {page.databytecounts[index] - len(data)} bytes into tile {index}")
        return data

    def read(self, level: int, x: int, y: int, w: int, h: int, cache: bool = True) -> np.ndarray:
        """Pixels [y:y+h, x:x+w] of ``level`` (level coordinates, inside the level);
        ``cache=False`` keeps no decoded tile (a sweep that reads each tile once)."""
        page = self._pages[level]
        tw, th = page.tilewidth, page.tilelength
        ncols = math.ceil(page.imagewidth / tw)
        if (w, h) == (tw, th) and x % tw == 0 and y % th == 0:
            # exactly one native tile: decode straight to the caller, no cache, no copy
            index = (y // th) * ncols + x // tw
            if page.databytecounts[index]:
                data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
                return page.decode(data, index, jpegtables=page.jpegtables)[0][0, :, :, :3]
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._tile(page, level, ty * ncols + tx, cache)
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                    y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                ]
        return out

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        os.close(self._fd)
        self._tif.close()


class Slide:
    """An open slide.  ``read(level, x, y, w, h)`` takes *level* coordinates and returns RGB.

    Regions that reach outside the level, and transparent pixels, come back white, as a
    scanner's background would.
    """

    def __init__(self, path: str | os.PathLike, backend: Backend = "auto") -> None:
        import openslide

        self.path = Path(path)
        if not self.path.exists():
            raise SlideError("no such file or folder", self.path)
        target = _resolve_openslide_path(self.path)
        try:
            vendor = openslide.OpenSlide.detect_format(str(target))
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types here
            raise SlideError(f"cannot be read as a slide ({exc})", self.path) from None
        if vendor is None:
            raise SlideError(
                "not a readable whole-slide image (unknown format, or a corrupt or truncated file)",
                self.path,
            )
        try:
            self._osr = openslide.OpenSlide(str(target))
            # Touch the pixels once: corrupt files often open but fail on the first read.
            self._osr.read_region((0, 0), self._osr.level_count - 1, (1, 1))
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).replace(f"Reading {target}:", "").replace(str(target), "")
            reason = reason.strip(" :") or type(exc).__name__
            raise SlideError(f"unsupported or corrupt slide ({reason})", self.path) from None
        props = self._osr.properties
        try:
            objective = float(props.get("openslide.objective-power", "") or 0) or None
        except ValueError:
            objective = None
        mpp, mpp_source = _mpp_from(props, objective)
        self.info = SlideInfo(
            slide_id=slide_id_for(self.path),
            source_name=self.path.name,
            source_bytes=_source_bytes(self.path),
            vendor=vendor,
            level_dimensions=tuple((int(d[0]), int(d[1])) for d in self._osr.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._osr.level_downsamples),
            mpp=mpp,
            mpp_source=mpp_source,
            objective_power=objective,
        )
        bg = props.get("openslide.background-color", "FFFFFF")
        self._background = np.array([int(bg[i : i + 2], 16) for i in (0, 2, 4)], np.uint8)
        self._direct: _DirectTiff | None = None
        if backend not in ("auto", "openslide", "direct"):
            raise SlideError(f"unknown reader backend {backend!r}", self.path)
        if backend != "openslide" and vendor in _DIRECT_VENDORS and self.path.is_file():
            try:
                self._direct = _DirectTiff(self.path, self.info.level_dimensions)
            except Exception:  # noqa: BLE001 - anything odd: OpenSlide stays in charge
                self._direct = None
        if backend == "direct" and (self._direct is None or not self._direct.has_level(0)):
            raise SlideError("no direct tile reader for this slide; use backend 'openslide'", self.path)
        self.backend = backend

    @property
    def background(self) -> np.ndarray:
        """The slide's background colour (RGB uint8): what areas with no pixels show."""
        return self._background

    @property
    def level_count(self) -> int:
        return len(self.info.level_dimensions)

    def uses_direct(self, level: int) -> bool:
        return self._direct is not None and self._direct.has_level(level)

    def native_tile_size(self, level: int) -> tuple[int, int] | None:
        """(width, height) of the stored tiles when the direct reader serves ``level``."""
        return self._direct.tile_size(level) if self.uses_direct(level) else None

    def native_page(self, level: int):
        """The tifffile page of ``level`` when the direct reader serves it, else None: where
        passthrough tiling finds the stored tiles' compression, tables and byte ranges."""
        return self._direct.page(level) if self.uses_direct(level) else None

    def raw_tile(self, level: int, index: int) -> bytes:
        """Stored (compressed) bytes of native tile ``index`` at ``level``; direct levels only."""
        try:
            return self._direct.raw(level, index)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot read tile {index} at level {level} ({exc})", self.path) from None

    def read(self, level: int, x: int, y: int, w: int, h: int, *, cache: bool = True) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of the region at ``level`` starting at level coords (x, y).

        ``cache=False``: decoded tiles are not kept for neighbours (the tissue channel reads
        each once; a full cache of 256-px tiles is ~50 MB)."""
        lw, lh = self.info.level_dimensions[level]
        if self.uses_direct(level):
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
            try:
                if (x0, y0, x1, y1) == (x, y, x + w, y + h):
                    return self._direct.read(level, x, y, w, h, cache)
                out = np.empty((h, w, 3), np.uint8)
                out[:] = self._background
                if x1 > x0 and y1 > y0:
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = self._direct.read(
                        level, x0, y0, x1 - x0, y1 - y0, cache
                    )
                return out
            except Exception as exc:  # noqa: BLE001
                raise SlideError(f"cannot decode tiles at level {level} ({exc})", self.path) from None
        ds = self.info.level_downsamples[level]
        try:
            rgba = np.asarray(
                self._osr.read_region((round(x * ds), round(y * ds)), level, (int(w), int(h)))
            )
        except Exception as exc:  # noqa: BLE001
            raise SlideError(f"cannot read region at level {level} ({exc})", self.path) from None
        return _flatten_rgba(rgba, self._background)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (within 1%)."""
        best = 0
        for i, d in enumerate(self.info.level_downsamples):
            if d <= downsample * 1.01:
                best = i
        return best

    def read_scaled(self, x0: float, y0: float, w: int, h: int, downsample: float, *,
                    cache: bool = True) -> np.ndarray:
        """A (h, w, 3) image of the level-0 rectangle at (x0, y0) seen at ``downsample``.

        Reads the best pyramid level and box-averages down the rest of the way; the one
        function behind tissue masks, pyramids and tiles at a target MPP.  ``cache`` as
        :meth:`read`.
        """
        level = self.best_level(downsample)
        ds = self.info.level_downsamples[level]
        factor = downsample / ds
        lx, ly = int(round(x0 / ds)), int(round(y0 / ds))
        if abs(factor - round(factor)) < 1e-3:
            k = int(round(factor))
            region = self.read(level, lx, ly, w * k, h * k, cache=cache)
            if k == 1:
                return region
            return box_reduce(region, k)
        from PIL import Image

        rw, rh = max(1, int(round(w * factor))), max(1, int(round(h * factor)))
        region = self.read(level, lx, ly, rw, rh, cache=cache)
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BOX))

    def clear_cache(self) -> None:
        """Drop the decoded tiles kept for neighbouring reads (up to 256, ~50 MB of 256-px
        tiles): a worker task whose reads share tiles only among themselves calls this when it
        ends, so a cached handle (``open_slide(cached=True)``) keeps none between tasks."""
        if self._direct is not None:
            self._direct.clear_cache()

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def box_reduce(region: np.ndarray, k: int) -> np.ndarray:
    """The (h, w, 3) uint8 means of ``region``'s k x k blocks, rounded half to even: equal to
    ``reshape(h, k, w, k, 3).mean(axis=(1, 3)).round()`` but 3-15x faster (whole rows summed
    first, in integers, then the columns of the much smaller result).

    >>> box_reduce(np.arange(48, dtype=np.uint8).reshape(4, 4, 3), 2)[..., 0].tolist()
    [[8, 14], [32, 38]]
    """
    hk, wk, c = region.shape
    h, w = hk // k, wk // k
    rows = region.reshape(h, k, wk * c).sum(axis=1, dtype=np.uint32)
    sums = rows.reshape(h, w, k, c).sum(axis=2)
    return np.rint(sums / (k * k)).astype(np.uint8)


def _flatten_rgba(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; composite over the slide's background colour."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) + background.astype(np.float32) * (1.0 - a)
    return np.clip(out.round(), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _cached(path: str, backend: str) -> Slide:
    return Slide(path, backend)  # type: ignore[arg-type]


def open_slide(path: str | os.PathLike, backend: Backend = "auto", *, cached: bool = False) -> Slide:
    """Open a slide.  ``cached=True`` reuses one handle per process (for worker tasks)."""
    if cached:
        return _cached(str(path), backend)
    return Slide(path, backend)

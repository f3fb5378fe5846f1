"""Tumour mask images (CAMELYON16 style): a tiled (or stripped) pyramidal TIFF whose pages are
the mask at level 0 and at lower resolutions, aligned to the slide.

Only the tiles a request touches are read and decoded (``os.pread`` + tifffile's decoder),
so a 100k x 200k mask costs memory in proportion to the window, not the slide.  Pixel
``(r, c)`` of ``read_region(x0, y0, w, h, ds)`` is the mask value under the level-0 point
``(x0 + (c + 0.5) * ds, y0 + (r + 0.5) * ds)`` (nearest neighbour, pixel-centre rule) in the
coarsest page no coarser than ``ds``: at a page's own downsample this returns the page's
pixels exactly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.annotations._errors import fail

__all__ = ["MaskAnnotation"]


def _downsample(full: int, size: int) -> float:
    """A page's downsample along one axis; snapped to the integer whose floor or ceil
    division gives ``size`` (pyramids store ``W // d`` or ``ceil(W / d)``)."""
    d = round(full / size)
    if d >= 1 and (full // d == size or -(-full // d) == size):
        return float(d)
    return full / size


class MaskAnnotation:
    """A label mask TIFF; ``read_region`` gives ``uint8`` labels at any downsample.

    ``slide_dimensions`` (level-0 ``width, height``) is checked against the mask's level 0;
    ``base_downsample`` says the mask's largest page is the slide at that downsample (a
    mask saved at a lower resolution).  Picklable: reopened lazily on a Dask worker.
    """

    def __init__(self, path, slide_dimensions: tuple[int, int] | None = None, *,
                 base_downsample: float = 1.0) -> None:
        self.path = Path(path)
        self.base_downsample = float(base_downsample)
        self._fd: int | None = None
        self._tif: Any = None  # tifffile.TiffFile once open
        levels = self._open()
        w0, h0 = levels[0].imagewidth, levels[0].imagelength
        b = self.base_downsample
        self.dimensions = (int(round(w0 * b)), int(round(h0 * b)))
        self._levels = [(p, _downsample(w0, p.imagewidth) * b, _downsample(h0, p.imagelength) * b)
                       for p in levels]
        if slide_dimensions is not None:
            sw, sh = (int(v) for v in slide_dimensions)
            ok = (abs(sw / b - w0) < 1 and abs(sh / b - h0) < 1) if b != 1 else (sw, sh) == (w0, h0)
            if not ok:
                self.close()
                raise fail(self.path, "level 0", f"mask is {w0}x{h0} but the slide is {sw}x{sh}"
                           + (f" (/{b:g} = {sw / b:.0f}x{sh / b:.0f})" if b != 1 else ""))

    # ------------------------------------------------------------------ file handling
    def _open(self) -> list:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(self.path)
        except (OSError, tifffile.TiffFileError, ValueError) as exc:
            raise fail(self.path, None, f"cannot be read as a TIFF mask ({exc})") from None
        self._fd = os.open(self.path, os.O_RDONLY)
        pages = [p for p in self._tif.pages if p.imagedepth == 1 and p.imagewidth > 0]
        if not pages:
            self.close()
            raise fail(self.path, None, "no image pages")
        base = pages[0]
        if base.samplesperpixel != 1 or base.bitspersample not in (1, 8):
            self.close()
            raise fail(self.path, "page 0", "a mask must be one 8-bit (or 1-bit) channel, got "
                       f"{base.samplesperpixel} channel(s) of {base.bitspersample} bits")
        # lower levels: single-channel pages no larger than level 0, same aspect (+-1 px)
        levels = [base] + [
            p for p in pages[1:]
            if p.samplesperpixel == 1 and p.bitspersample in (1, 8)
            and p.imagewidth < base.imagewidth
            and abs(base.imagewidth / p.imagewidth * p.imagelength - base.imagelength)
            <= base.imagewidth / p.imagewidth + 1]
        return sorted(levels, key=lambda p: -p.imagewidth)

    def __getstate__(self):
        return {"path": self.path, "base_downsample": self.base_downsample}

    def __setstate__(self, state):
        self.__init__(state["path"], base_downsample=state["base_downsample"])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tif is not None:
            self._tif.close()
            self._tif = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> MaskAnnotation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    @property
    def downsamples(self) -> list[float]:
        """Level-0 pixels per mask pixel of each page (x axis), finest first."""
        return [dx for _, dx, _ in self._levels]

    def best_level(self, downsample: float) -> int:
        """The coarsest page whose downsample is at most ``downsample``."""
        ok = [i for i, (_, dx, dy) in enumerate(self._levels)
              if max(dx, dy) <= downsample * (1 + 1e-9)]
        return ok[-1] if ok else 0

    def _segment(self, page, index: int) -> np.ndarray | None:
        if page.databytecounts[index] == 0:  # sparse tile: nothing annotated
            return None
        assert self._fd is not None, "mask file is closed"
        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        arr, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        return arr.reshape(arr.shape[1:3]) if arr.ndim == 4 else arr

    def _read_page(self, page, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[y:y+h, x:x+w]`` of one page (inside it), decoding only what is needed."""
        out = np.zeros((h, w), np.uint8)
        if page.is_tiled:
            tw, th = page.tilewidth, page.tilelength
        else:
            tw, th = page.imagewidth, page.rowsperstrip or page.imagelength
        ncols = math.ceil(page.imagewidth / tw)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                seg = self._segment(page, ty * ncols + tx)
                if seg is None:
                    continue
                x0, y0 = max(x, tx * tw), max(y, ty * th)
                x1, y1 = min(x + w, (tx + 1) * tw), min(y + h, (ty + 1) * th)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - ty * th:y1 - ty * th,
                                                        x0 - tx * tw:x1 - tx * tw]
        return out

    def read_region(self, x0: float, y0: float, w: int, h: int, downsample: float = 1.0
                    ) -> np.ndarray:
        """``(h, w)`` uint8 labels of the level-0 window at ``(x0, y0)``, one pixel per
        ``downsample`` level-0 pixels; outside the mask reads 0."""
        if self._fd is None:
            raise fail(self.path, None, "mask is closed")
        if downsample <= 0 or w < 0 or h < 0:
            raise ValueError("downsample must be positive and w, h non-negative")
        page, dx, dy = self._levels[self.best_level(downsample)]
        ix = np.floor((x0 + (np.arange(w) + 0.5) * downsample) / dx).astype(np.int64)
        iy = np.floor((y0 + (np.arange(h) + 0.5) * downsample) / dy).astype(np.int64)
        okx = (ix >= 0) & (ix < page.imagewidth)
        oky = (iy >= 0) & (iy < page.imagelength)
        out = np.zeros((h, w), np.uint8)
        if not okx.any() or not oky.any():
            return out
        cx0, cx1 = int(ix[okx].min()), int(ix[okx].max()) + 1
        cy0, cy1 = int(iy[oky].min()), int(iy[oky].max()) + 1
        window = self._read_page(page, cx0, cy0, cx1 - cx0, cy1 - cy0)
        out[np.ix_(oky, okx)] = window[np.ix_(iy[oky] - cy0, ix[okx] - cx0)]
        return out

"""Feeding the model: read ahead on a thread, cut patches, hand over fixed-size batches.

``Prefetcher`` runs a producer (Zarr chunk reads, slide reads, colour deconvolution, patch
cutting) on a thread ``depth`` batches ahead of the model; decoding and TensorFlow both
release the GIL, so reading overlaps prediction.  It measures how long the model waited,
which every task records (``io_wait_s``): near zero means the model never waited on I/O.

Sources yield *pieces* ``(keys, arrays)``; :func:`rebatch` turns pieces of any size into
batches of exactly ``batch`` items (the last may be short), copying each item once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

__all__ = ["Prefetcher", "rebatch", "tile_pieces", "cut_patches", "point_blocks", "slide_pieces"]

_END = object()


class Prefetcher:
    """Iterate ``make()``'s items, produced on a background thread ``depth`` items ahead.

    An exception in the producer is raised in the consumer; leaving the ``with`` block early
    stops the producer.  ``wait_s`` is the time the consumer spent waiting for items.
    """

    def __init__(self, make: Callable[[], Iterable], depth: int = 2) -> None:
        self._make = make
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpcpath-prefetch", daemon=True)
        self.wait_s = 0.0
        self.items = 0

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._make():
                if not self._put((None, item)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put((exc, None))
            return
        self._put((None, _END))

    def __enter__(self) -> Prefetcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def __iter__(self) -> Iterator:
        while True:
            t0 = time.perf_counter()
            err, item = self._q.get()
            self.wait_s += time.perf_counter() - t0
            if err is not None:
                raise err
            if item is _END:
                return
            self.items += 1
            yield item


def rebatch(pieces: Iterable[tuple[np.ndarray, dict[str, np.ndarray]]], batch: int
            ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``(keys (n, ...), {name: (n, ...)})`` pieces -> batches of exactly ``batch`` items.

    Each item is copied once, into a fresh batch buffer; the last batch may be short.
    """
    buf_keys: list[np.ndarray] = []
    buf: dict[str, list[np.ndarray]] = {}
    have = 0

    def emit(n: int):
        nonlocal buf_keys, have
        keys = np.concatenate(buf_keys)
        out = {}
        for name, parts in buf.items():
            dst = np.empty((n, *parts[0].shape[1:]), parts[0].dtype)
            pos, rest = 0, []
            for p in parts:
                take = min(len(p), n - pos)
                if take:
                    dst[pos : pos + take] = p[:take]
                    pos += take
                if take < len(p):
                    rest.append(p[take:])
            buf[name] = rest
            out[name] = dst
        buf_keys = [keys[n:]] if len(keys) > n else []
        have -= n
        return keys[:n], out

    for keys, arrays in pieces:
        if len(keys) == 0:
            continue
        buf_keys.append(keys)
        for name, a in arrays.items():
            buf.setdefault(name, []).append(a)
        have += len(keys)
        while have >= batch:
            yield emit(batch)
    if have:
        yield emit(have)


def tile_pieces(images, start: int, stop: int) -> Iterator[tuple[np.ndarray, dict]]:
    """Rows ``[start, stop)`` of a store's tile array, chunk by chunk: every chunk is decoded
    once, straight from its file where the codec allows (``hpcpath.chunkread``)."""
    from hpcpath.chunkread import ChunkReader

    reader = ChunkReader(images)
    n = reader.rows_per_chunk
    a = start
    while a < stop:
        b = min(stop, (a // n + 1) * n)
        yield np.arange(a, b), {"main": reader.read(a, b)}
        a = b


def cut_patches(img: np.ndarray, offsets: np.ndarray, patch: int) -> np.ndarray:
    """``(N, patch, patch, C)`` copies of ``img`` at top-left ``offsets`` (N, 2) = (row, col),
    all inside ``img``; one fancy-indexing gather over a strided view."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    h, w, c = img.shape
    if len(offsets) and (offsets.min() < 0 or (offsets[:, 0] + patch).max() > h
                         or (offsets[:, 1] + patch).max() > w):
        raise ValueError("patch outside the image read for it")
    s0, s1, s2 = img.strides
    view = np.lib.stride_tricks.as_strided(
        img, (h - patch + 1, w - patch + 1, patch, patch, c), (s0, s1, s0, s1, s2), writeable=False)
    return view[offsets[:, 0], offsets[:, 1]]


def point_blocks(points_px: np.ndarray, span: float) -> Iterator[np.ndarray]:
    """Indices of ``points_px`` (N, 2) = (x, y) grouped by the ``span`` x ``span`` square
    they fall in, squares in row-major order, points in input order within a square."""
    if len(points_px) == 0:
        return
    ij = np.floor(np.asarray(points_px, np.float64) / span).astype(np.int64)
    ij -= ij.min(0)
    key = ij[:, 1] * (int(ij[:, 0].max()) + 1) + ij[:, 0]
    order = np.argsort(key, kind="stable")
    yield from np.split(order, np.flatnonzero(np.diff(key[order])) + 1)


def read_around(slide, centres0: np.ndarray, ds: float, patch: int, halo: int = 0):
    """Read the box covering ``patch`` x ``patch`` patches (at ``ds``) centred on ``centres0``
    plus ``halo`` pixels; returns (image, top-left offsets of the patches in it, origin0)."""
    tl = np.round(centres0 / ds - patch / 2).astype(np.int64)  # patch px, global
    lo = tl.min(0) - halo
    hi = tl.max(0) + patch + halo
    img = slide.read_scaled(float(lo[0] * ds), float(lo[1] * ds), int(hi[0] - lo[0]),
                            int(hi[1] - lo[1]), ds)
    return img, (tl - lo)[:, ::-1], lo * ds


def slide_pieces(slide, centres0: np.ndarray, ds: float, patch: int,
                 context: Mapping[str, float] | None = None, block_px: int = 2048
                 ) -> Iterator[tuple[np.ndarray, dict]]:
    """Patches centred on level-0 ``centres0`` (grid windows), read block by block from the
    slide at ``ds``; with ``context`` ({input name: factor}) also the same centres read
    ``factor`` times coarser."""
    centres0 = np.asarray(centres0, np.float64).reshape(-1, 2)
    span = max(1, block_px - patch)  # centres of one block lie within span: reads <= block_px
    for idx in point_blocks(centres0 / ds, span):
        c = centres0[idx]
        img, off, _ = read_around(slide, c, ds, patch)
        arrays = {"main": cut_patches(img, off, patch)}
        for name, f in (context or {}).items():
            cimg, coff, _ = read_around(slide, c, ds * f, patch)
            arrays[name] = cut_patches(cimg, coff, patch)
        yield idx, arrays

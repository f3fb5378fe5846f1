"""Polygon rasterisation with one exact rule shared by masks, labels and ground truth.

The contract: a raster pixel belongs to a polygon when its *centre* lies inside it (even-odd
rule), with half-open edges (``x_left <= px < x_right`` between sorted scanline crossings, and
an edge spans ``y_min <= py < y_max``).  Every path that turns polygons into pixels (the
synthetic slide generator, tumour masks, ASAP XML and GeoJSON label rasterisation) goes through
this module, so the same polygon gives the same pixels everywhere, at every pyramid level, and
two polygons that share an edge never both claim a pixel.

Coordinates are level-0 pixel coordinates ``(x, y)``; pixel ``(r, c)`` of a raster with
``origin`` and ``downsample`` has its centre at
``(origin[0] + (c + 0.5) * downsample, origin[1] + (r + 0.5) * downsample)``.
Pure numpy: no shapely needed at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["rasterize_polygons", "points_in_polygons", "polygon_rings"]


def polygon_rings(polygon) -> list[np.ndarray]:
    """Normalise one polygon to a list of ``(K, 2)`` float rings ``[outer, hole, ...]``.

    A polygon is either one ``(K, 2)`` array of ``(x, y)`` vertices or a list of such rings.
    A closing vertex equal to the first is harmless (it adds a zero-length edge).
    """
    if isinstance(polygon, np.ndarray):
        rings = list(polygon) if polygon.ndim == 3 else [polygon]
    elif len(polygon) and np.ndim(polygon[0]) == 2:
        rings = list(polygon)
    else:
        rings = [polygon]
    out = []
    for ring in rings:
        arr = np.asarray(ring, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"a polygon ring must be (K, 2) x,y vertices, got shape {arr.shape}")
        if len(arr) >= 3:
            out.append(arr)
    return out


def _edges(rings: list[np.ndarray]) -> np.ndarray:
    """Non-horizontal edges of all rings as an ``(E, 4)`` array ``x1, y1, x2, y2``."""
    if not rings:
        return np.zeros((0, 4))
    parts = [np.concatenate([r, np.roll(r, -1, axis=0)], axis=1) for r in rings]
    e = np.concatenate(parts)
    return e[e[:, 1] != e[:, 3]]


def _crossing_x(e: np.ndarray, py: np.ndarray) -> np.ndarray:
    """x where the scanline ``y = py`` crosses each edge (one formula, used everywhere)."""
    x1, y1, x2, y2 = e[..., 0], e[..., 1], e[..., 2], e[..., 3]
    return x1 + (py - y1) * (x2 - x1) / (y2 - y1)


def _inside_window(edges: np.ndarray, ra: int, rb: int, ca: int, cb: int, ox: float,
                   oy: float, ds: float) -> np.ndarray:
    """Boolean even-odd inside map of one polygon for window rows ``ra:rb``, cols ``ca:cb``.

    Each edge is expanded only into the rows its y-span covers (clipped to the window), so
    the cost follows the polygon's overlap with the window, not the polygon or window size.
    Centres are always computed as ``origin + (index + 0.5) * ds`` with the full-raster index,
    bit for bit the formula callers use, so float rounding cannot move a boundary pixel.
    """
    rows, cols = rb - ra, cb - ca
    ylo = np.minimum(edges[:, 1], edges[:, 3])
    yhi = np.maximum(edges[:, 1], edges[:, 3])
    # candidate rows, one row of slack either side; the exact test below decides
    r0 = np.clip(np.floor((ylo - oy) / ds - 0.5).astype(np.int64), ra, rb)
    r1 = np.clip(np.ceil((yhi - oy) / ds - 0.5).astype(np.int64) + 1, ra, rb)
    n = r1 - r0
    keep = n > 0
    edges, r0, n, ylo, yhi = edges[keep], r0[keep], n[keep], ylo[keep], yhi[keep]
    inside = np.zeros((rows, cols + 1), dtype=np.uint8)
    if len(edges) == 0:
        return inside[:, :cols].astype(bool)
    eidx = np.repeat(np.arange(len(edges)), n)
    starts = np.cumsum(n) - n
    r = np.repeat(r0, n) + (np.arange(eidx.size) - np.repeat(starts, n))
    py = oy + (r + 0.5) * ds
    hit = (ylo[eidx] <= py) & (py < yhi[eidx])
    r, eidx, py = r[hit], eidx[hit], py[hit]
    xi = _crossing_x(edges[eidx], py)
    # first column whose centre px satisfies px >= xi, made exact against float rounding
    c = np.ceil((xi - ox) / ds - 0.5).astype(np.int64)
    c -= (ox + (c - 0.5) * ds) >= xi
    c += (ox + (c + 0.5) * ds) < xi
    np.clip(c, ca, cb, out=c)
    np.add.at(inside, (r - ra, c - ca), 1)  # toggles; uint8 wraps at 256, parity survives
    np.cumsum(inside, axis=1, dtype=np.uint8, out=inside)
    return (inside[:, :cols] & 1).astype(bool)


def rasterize_polygons(
    polygons: Sequence,
    shape: tuple[int, int],
    *,
    origin: tuple[float, float] = (0.0, 0.0),
    downsample: float = 1.0,
    values: Sequence[int] | None = None,
) -> np.ndarray:
    """Rasterise polygons into a ``uint8`` array of ``shape`` (rows, cols).

    Pixel ``(r, c)`` covers level-0 ``x = origin[0] + c * downsample`` onwards (same for y) and
    is set when its centre is inside (module docstring).  ``values`` gives each polygon's value
    (default 1); later polygons overwrite earlier ones.  Only polygons whose bounding box meets
    the window, and only the rows and columns of that overlap, cost any work.
    """
    rows, cols = int(shape[0]), int(shape[1])
    out = np.zeros((rows, cols), dtype=np.uint8)
    ds = float(downsample)
    if ds <= 0:
        raise ValueError("downsample must be positive")
    ox, oy = float(origin[0]), float(origin[1])
    if values is not None and len(values) != len(polygons):
        raise ValueError("values must have one entry per polygon")
    for i, poly in enumerate(polygons):
        rings = polygon_rings(poly)
        if not rings:
            continue
        allv = np.concatenate(rings)
        xmin, ymin = allv.min(axis=0)
        xmax, ymax = allv.max(axis=0)
        # window rows/cols whose centres can fall in the bounding box (+1 slack each side)
        ra = max(int(np.floor((ymin - oy) / ds - 0.5)), 0)
        rb = min(int(np.ceil((ymax - oy) / ds - 0.5)) + 1, rows)
        ca = max(int(np.floor((xmin - ox) / ds - 0.5)), 0)
        cb = min(int(np.ceil((xmax - ox) / ds - 0.5)) + 1, cols)
        if ra >= rb or ca >= cb:
            continue
        mask = _inside_window(_edges(rings), ra, rb, ca, cb, ox, oy, ds)
        value = 1 if values is None else int(values[i])
        out[ra:rb, ca:cb][mask] = value
    return out


def points_in_polygons(points, polygons: Sequence) -> np.ndarray:
    """Boolean per point: inside any of ``polygons`` under the same centre/even-odd rule.

    Used by tests and by the generator to place objects, so "inside" means exactly what the
    rasteriser means by it.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    result = np.zeros(len(pts), dtype=bool)
    for poly in polygons:
        edges = _edges(polygon_rings(poly))
        if len(edges) == 0:
            continue
        ylo = np.minimum(edges[:, 1], edges[:, 3])
        yhi = np.maximum(edges[:, 1], edges[:, 3])
        for s in range(0, len(pts), 4096):  # bound the (points x edges) temporaries
            px, py = pts[s:s + 4096, :1], pts[s:s + 4096, 1:]
            span = (ylo <= py) & (py < yhi)
            with np.errstate(invalid="ignore", divide="ignore"):
                xi = _crossing_x(edges, py)
            odd = (np.count_nonzero(span & (xi <= px), axis=1) & 1).astype(bool)
            result[s:s + 4096] |= odd
    return result

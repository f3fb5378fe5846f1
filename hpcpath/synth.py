"""Synthetic H&E whole-slide images with planted ground truth, at any size.

Why: tests, benchmarks and demos need slides whose answers are known exactly (tumour regions,
mitoses) and whose size can be dialled from a few tiles to 50,000 px without shipping data.
Every pixel is a pure function of ``seed`` and its level-0 position, so slides are
byte-identical across runs, tiles can be rendered in any order, and lower pyramid levels are
rendered directly at their own resolution instead of from a level 0 held in memory.

Regions are drawn with :func:`hpcpath.geometry.rasterize_polygons` (pixel-centre rule), so the
tumour in the pixels, the tumour mask TIFF, the GeoJSON and the ASAP XML agree exactly.
The label image, the ``Filename`` and ``User`` fields carry fake identifiers
(:attr:`SynthTruth.phi`) so privacy tests can check they never reach any output.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from hpcpath.geometry import points_in_polygons, polygon_rings, rasterize_polygons

__all__ = ["SynthTruth", "write_synthetic_slide", "make_cohort", "load_truth",
           "pyramid_downsamples"]

BACKGROUND = (238, 236, 240)
_Q = 80.0                      # uint8 texture units per optical density
_PERIODS = (1024, 1216)        # two periodic texture layers; combined period 19,456 px
_TEX_DS = (1, 4, 16, 64)       # texture pyramid (both periods divide by 64)
_STAIN_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_STAIN_E = np.array([0.10, 0.95, 0.30]) / np.linalg.norm([0.10, 0.95, 0.30])
_LIB = "Aperio Image Library v12.0.15 "
_FONT = {  # 5x7 glyphs, one 5-bit int per row: enough for the fake identifiers
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (30, 1, 1, 14, 1, 1, 30), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "-": (0, 0, 0, 31, 0, 0, 0), "A": (14, 17, 17, 31, 17, 17, 17),
    "E": (31, 16, 16, 30, 16, 16, 31), "I": (14, 4, 4, 4, 4, 4, 14), "N": (17, 25, 21, 19, 17, 17, 17),
    "P": (30, 17, 17, 30, 16, 16, 16), "T": (31, 4, 4, 4, 4, 4, 4),
}


@dataclass(frozen=True)
class SynthTruth:
    """What was planted in a synthetic slide; all coordinates are level-0 pixels (x, y)."""

    slide: Path
    width: int
    height: int
    mpp: float
    tissue: list[np.ndarray]
    tumour: list[np.ndarray]
    mitoses: np.ndarray
    files: dict[str, Path]
    seed: int = 0
    tile: int = 256
    phi: tuple[str, ...] = ()                 # fake identifiers that must never leak
    downsamples: tuple[int, ...] = field(default=(1,))
    mitosis_radius_px: float = 8.0


def pyramid_downsamples(width: int, height: int, tile: int = 256) -> list[int]:
    """1, 4, 16, ... while the level (floor-divided, as Aperio does) is at least one tile."""
    out, d = [1], 4
    while max(width // d, height // d) >= tile:
        out.append(d)
        d *= 4
    return out


# ----------------------------------------------------------------------------- geometry
def _star(rng, k: int, rough: float) -> np.ndarray:
    """Unit blob: a noisy radius function of angle, so the polygon is always simple."""
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    r = np.ones(k)
    for h in range(2, 8):
        r += rng.uniform(0, rough / h) * np.cos(h * t + rng.uniform(0, 2 * np.pi))
    wiggle = np.convolve(np.tile(rng.normal(0, 1, k), 3), np.ones(5) / 5, "same")[k:2 * k]
    r = np.clip(r + 0.15 * rough * wiggle, 0.5, None)
    return np.c_[r * np.cos(t), r * np.sin(t)]


def _rotate(p: np.ndarray, a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return p @ np.array([[c, s], [-s, c]])


def _edge_distance(pts: np.ndarray, polys) -> np.ndarray:
    """Distance from each point to the nearest edge of any polygon."""
    rings = [r for p in polys for r in polygon_rings(p)]
    if not rings or len(pts) == 0:
        return np.full(len(pts), np.inf)
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    ab = b - a
    out = np.empty(len(pts))
    for s in range(0, len(pts), 512):
        d = pts[s:s + 512, None, :] - a[None]
        t = np.clip((d * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
        out[s:s + 512] = np.hypot(*(d - t[..., None] * ab).transpose(2, 0, 1)).min(axis=1)
    return out


def _tissue(rng, w: int, h: int, n: int) -> list[np.ndarray]:
    """n blobs, one per cell of a near-square grid, each filling 70-90% of its cell's box."""
    if n <= 0:
        return []
    gc = min(range(1, n + 1), key=lambda c: abs(np.log((w / c) / (h / -(-n // c))))
             + 0.6 * (c * -(-n // c) - n) / n)
    gr = -(-n // gc)
    cells = rng.permutation(gr * gc)[:n]
    cw, ch = w / gc, h / gr
    out = []
    for cell in sorted(cells):
        p = _rotate(_star(rng, int(rng.integers(60, 201)), 0.35) * [1, rng.uniform(0.6, 1)],
                    rng.uniform(0, np.pi))
        lo, hi = p.min(0), p.max(0)
        size = np.array([cw, ch]) * rng.uniform(0.72, 0.9, 2)
        slack = np.array([cw, ch]) * 0.95 - size
        centre = (np.array([cell % gc + 0.5, cell // gc + 0.5]) * [cw, ch]
                  + rng.uniform(-0.5, 0.5, 2) * slack)
        out.append(np.round((p - (lo + hi) / 2) / (hi - lo) * size + centre, 2))
    return out


def _tumours(rng, tissue, n: int) -> list[np.ndarray]:
    """Blobs placed where a disc around them is clear of the tissue edge and other tumours."""
    out, discs = [], []
    for j in range(n if tissue else 0):
        host = tissue[j % len(tissue)]
        lo, hi = host.min(0), host.max(0)
        cand = rng.uniform(lo, hi, (600, 2))
        cand = cand[points_in_polygons(cand, [host])]
        clear = _edge_distance(cand, [host])
        for c, r in discs:
            clear = np.minimum(clear, np.hypot(*(cand - c).T) - r)
        if len(cand) == 0 or clear.max() <= 20:
            continue
        best = np.argsort(clear)[-max(1, len(cand) // 10):]
        i = best[rng.integers(len(best))]
        radius = clear[i] * rng.uniform(0.5, 0.8)
        p = _rotate(_star(rng, int(rng.integers(60, 161)), 0.5) * [1, rng.uniform(0.6, 1)],
                    rng.uniform(0, np.pi))
        p = p / np.hypot(*p.T).max() * radius + cand[i]
        out.append(np.round(p, 2))
        discs.append((cand[i], radius))
    return out


def _points(rng, n, inside, outside, clear_of, rr, taken: list) -> list:
    """Rejection-sample n points in ``inside`` minus ``outside``, 2 radii from edges and
    4 radii from each other (mitoses never touch)."""
    out: list = []
    if n <= 0 or not inside:
        return out
    allv = np.concatenate([polygon_rings(p)[0] for p in inside])
    lo, hi = allv.min(0), allv.max(0)
    for _ in range(60):
        cand = rng.uniform(lo, hi, (256, 2))
        ok = points_in_polygons(cand, inside)
        if outside:
            ok &= ~points_in_polygons(cand, outside)
        cand = cand[ok]
        cand = cand[_edge_distance(cand, clear_of) >= 2 * rr]
        for p in cand:
            if all(np.hypot(*(p - q)) >= 4 * rr for q in taken + out):
                out.append(np.round(p, 2))
                if len(out) == n:
                    return out
    return out


# ----------------------------------------------------------------------------- textures
def _stamp_nuclei(rng, canvas, spacing, fill, make):
    """Jittered-grid nuclei on a periodic canvas (wrap-around indices keep it seamless)."""
    p = canvas.shape[0]
    n = max(1, round(p / spacing))
    for iy in range(n):
        for ix in range(n):
            if rng.random() > fill:
                continue
            stamp = make(rng)
            s = stamp.shape[0]
            y, x = ((np.array([iy, ix]) + 0.5 + rng.uniform(-0.45, 0.45, 2)) * p / n).astype(int)
            rows, cols = np.ix_((y - s // 2 + np.arange(s)) % p, (x - s // 2 + np.arange(s)) % p)
            canvas[rows, cols] = np.maximum(canvas[rows, cols], stamp)


def _nucleus(rng, a, b, angle, rough, od, vesicular=False):
    """One nucleus as an optical-density stamp: irregular ellipse, chromatin speckle."""
    s = int(2 * max(a, b) * (1 + rough) + 4) | 1
    yy, xx = (np.mgrid[:s, :s] - s // 2) + rng.uniform(-0.5, 0.5, (2, 1, 1))
    u, v = _rotate(np.c_[xx.ravel(), yy.ravel()], angle).T.reshape(2, s, s)
    rho, th = np.hypot(u / a, v / b), np.arctan2(v, u)
    edge = 1 + sum(rng.uniform(0, rough) * np.cos(h * th + rng.uniform(0, 6.3)) for h in (2, 3, 5))
    alpha = np.clip((edge - rho) * min(a, b) + 0.5, 0, 1)
    tone = od * (0.85 + 0.3 * rng.random((s, s)))
    if vesicular:  # pale centre, dark rim, a nucleolus
        tone *= 0.65 + 0.45 * np.clip(rho / edge, 0, 1) ** 3
        ny, nx = rng.uniform(-0.3, 0.3, 2) * min(a, b)
        tone = np.where(np.hypot(xx - nx, yy - ny) < max(1.0, 0.2 * min(a, b)), od * 1.5, tone)
    return (alpha * tone).astype(np.float32)


def _fibres(rng, p: int, angle: float, px_um: float) -> np.ndarray:
    """Periodic streaky noise: white noise through an oriented Gaussian filter (FFT)."""
    f = np.fft.fftfreq(p)
    fu, fv = np.meshgrid(f, f)
    along = fu * np.cos(angle) + fv * np.sin(angle)
    across = -fu * np.sin(angle) + fv * np.cos(angle)
    filt = np.exp(-(along / (0.02 / px_um)) ** 2 - (across / (0.15 / px_um)) ** 2)
    out = np.fft.ifft2(np.fft.fft2(rng.normal(size=(p, p))) * filt).real
    return out / out.std()


@functools.lru_cache(maxsize=4)
def _textures(seed: int, mpp: float, tile: int) -> dict:
    """Periodic stain-density layers per period and level, padded by one tile for slicing.

    Stroma: eosin fibres with sparse elongated fibroblasts and a few lymphocytes.  Tumour:
    crowded, large, pleomorphic vesicular nuclei on purple-ish cytoplasm.  Two periods whose
    least common multiple is ~19k px hide the repetition; lower levels are block means.
    """
    um = 1.0 / mpp  # pixels per micrometre
    tex: dict = {}
    for p in _PERIODS:
        rng = np.random.default_rng([seed, 11, p])
        ang = rng.uniform(0, np.pi)
        fib = _fibres(rng, p, ang, um) + 0.6 * _fibres(rng, p, ang + rng.uniform(0.4, 1.2), um)
        low = _fibres(rng, p, 0.0, um / 12)
        layers = {
            "sE": np.clip(0.19 + 0.085 * fib + 0.03 * low + rng.normal(0, 0.02, (p, p)), 0.01, None),
            "sH": np.full((p, p), 0.03) + rng.normal(0, 0.01, (p, p)),
            "tE": np.clip(0.13 + 0.03 * low + rng.normal(0, 0.025, (p, p)), 0.01, None),
            "tH": np.clip(0.21 + 0.04 * low + rng.normal(0, 0.03, (p, p)), 0, None),
        }

        def fibro(r):
            if r.random() < 0.25:  # lymphocyte: small, round, dark
                return _nucleus(r, 3.5 * um / 2, 3.3 * um / 2, 0, 0.08, 1.5)
            return _nucleus(r, r.uniform(5, 8) * um / 2, r.uniform(1.4, 2.2) * um / 2,
                            ang + r.normal(0, 0.25), 0.1, 1.1)

        def tumour(r):
            k = r.lognormal(0, 0.22)
            return _nucleus(r, k * r.uniform(4.5, 6.5) * um, k * r.uniform(3.5, 5) * um,
                            r.uniform(0, np.pi), 0.18, r.uniform(0.8, 1.1), vesicular=True)

        _stamp_nuclei(rng, layers["sH"], 28 * um, 0.85, fibro)
        _stamp_nuclei(rng, layers["tH"], 11.5 * um * 1.4142, 0.95, tumour)
        layers["tE"] *= np.clip(1 - layers["tH"], 0.3, 1)
        for name, arr in layers.items():
            arr = np.clip(arr * _Q, 0, 127 if name.endswith("E") else 255).astype(np.float32)
            for d in _TEX_DS:
                pd = p // d
                lv = arr.reshape(pd, d, pd, d).mean((1, 3)) if d > 1 else arr
                reps = -(-(pd + tile) // pd)
                tex[name, p, d] = np.tile(np.round(lv).astype(np.uint8), (reps, reps))[
                    :pd + tile, :pd + tile]
    rng = np.random.default_rng([seed, 12])
    bg = np.array(BACKGROUND) + rng.normal(0, 1.2, (1024, 1024, 3))
    bg = np.clip(np.round(bg), 0, 255).astype(np.uint32)
    bg = bg[..., 0] | bg[..., 1] << 8 | bg[..., 2] << 16
    for d in _TEX_DS:  # noise, not structure: the same field serves every level
        tex["bg", 1024, d] = np.tile(bg, (2, 2))[:1024 + tile, :1024 + tile]
    h, e = np.meshgrid(np.arange(256) / _Q, np.arange(256) / _Q, indexing="ij")
    od = h[..., None] * _STAIN_H + e[..., None] * _STAIN_E
    rgb = np.clip(np.round(np.array(BACKGROUND) * np.exp(-od)), 0, 255).astype(np.uint32)
    tex["lut"] = (rgb[..., 0] | rgb[..., 1] << 8 | rgb[..., 2] << 16).reshape(-1)
    return tex


def _sample(tex, name, p, x0, y0, ds, rows, cols):
    """Window of a periodic layer: a slice on pyramid levels, nearest-neighbour otherwise."""
    if ds in _TEX_DS and x0 % ds == 0 and y0 % ds == 0 and rows <= cols <= tex[name, p, ds].shape[0] - p // ds:
        pd = p // ds
        oy, ox = int(y0 // ds) % pd, int(x0 // ds) % pd
        return tex[name, p, ds][oy:oy + rows, ox:ox + cols]
    d = max([t for t in _TEX_DS if t <= ds] or [1])
    pd = p // d
    iy = np.floor((y0 + (np.arange(rows) + 0.5) * ds) / d).astype(np.int64) % pd
    ix = np.floor((x0 + (np.arange(cols) + 0.5) * ds) / d).astype(np.int64) % pd
    return tex[name, p, d][np.ix_(iy, ix)]


# ----------------------------------------------------------------------------- rendering
@dataclass
class _Scene:
    tex: dict
    polys: list
    values: list
    boxes: np.ndarray       # (n, 4) xmin, ymin, xmax, ymax of every polygon
    mitoses: np.ndarray
    mshape: np.ndarray      # (M, 8) per-mitosis shape parameters
    rr: float


def _scene(truth_parts, seed, mpp, tile, rr) -> _Scene:
    tissue, tumour, mitoses = truth_parts
    polys = tissue + tumour
    boxes = np.array([[*p.min(0), *p.max(0)] for p in polys]).reshape(-1, 4)
    rng = np.random.default_rng([seed, 13])
    mshape = np.c_[rng.uniform(1.0, 1.5, len(mitoses)), rng.uniform(0, np.pi, (len(mitoses), 1)),
                   rng.uniform(0, 0.15, (len(mitoses), 3)), rng.uniform(0, 6.3, (len(mitoses), 3))]
    return _Scene(_textures(seed, mpp, tile), polys, [1] * len(tissue) + [2] * len(tumour),
                  boxes, mitoses.reshape(-1, 2), mshape, rr)


def _render(sc: _Scene, x0: float, y0: float, ds: float, rows: int, cols: int) -> np.ndarray:
    """RGB window whose pixel (r, c) shows the scene at level-0 centre (x0+(c+.5)ds, ...)."""
    t = sc.tex
    bg = _sample(t, "bg", 1024, x0, y0, ds, rows, cols)
    x1, y1 = x0 + cols * ds, y0 + rows * ds
    hit = ((sc.boxes[:, 0] < x1) & (sc.boxes[:, 2] > x0) & (sc.boxes[:, 1] < y1)
           & (sc.boxes[:, 3] > y0))
    region = None
    if hit.any():
        idx = np.flatnonzero(hit)
        region = rasterize_polygons([sc.polys[i] for i in idx], (rows, cols), origin=(x0, y0),
                                    downsample=ds, values=[sc.values[i] for i in idx])
    if region is None or not region.any():
        packed = bg
    else:
        a, b = _PERIODS
        hh = np.maximum(_sample(t, "sH", a, x0, y0, ds, rows, cols),
                        _sample(t, "sH", b, x0, y0, ds, rows, cols))
        ee = _sample(t, "sE", a, x0, y0, ds, rows, cols) + _sample(t, "sE", b, x0, y0, ds, rows, cols)
        tum = region == 2
        if tum.any():
            th = np.maximum(_sample(t, "tH", a, x0, y0, ds, rows, cols),
                            _sample(t, "tH", b, x0, y0, ds, rows, cols))
            te = _sample(t, "tE", a, x0, y0, ds, rows, cols) + _sample(t, "tE", b, x0, y0, ds, rows, cols)
            hh, ee = np.where(tum, th, hh), np.where(tum, te, ee)
        _draw_mitoses(sc, hh, ee, x0, y0, ds)
        rgb = t["lut"].take((hh.astype(np.uint16) << 8) | ee)
        packed = np.where(region > 0, rgb, bg)
    return np.ascontiguousarray(packed.view(np.uint8).reshape(rows, cols, 4)[..., :3])


def _draw_mitoses(sc: _Scene, hh, ee, x0, y0, ds):
    """Very dark compact irregular blobs, drawn analytically so every level agrees."""
    if not len(sc.mitoses):
        return
    rows, cols = hh.shape
    m = sc.rr * 1.6
    near = np.flatnonzero((sc.mitoses[:, 0] > x0 - m) & (sc.mitoses[:, 0] < x0 + cols * ds + m)
                          & (sc.mitoses[:, 1] > y0 - m) & (sc.mitoses[:, 1] < y0 + rows * ds + m))
    for i in near:
        (mx, my), (anis, ang, *ha) = sc.mitoses[i], sc.mshape[i]
        ca, cb = (max(0, int((v - m - o) / ds)) for v, o in ((mx, x0), (my, y0)))
        ra, rb = max(0, int((my - m - y0) / ds)), min(rows, int((my + m - y0) / ds) + 2)
        ca, cb = max(0, int((mx - m - x0) / ds)), min(cols, int((mx + m - x0) / ds) + 2)
        if ra >= rb or ca >= cb:
            continue
        dy, dx = np.meshgrid(y0 + (np.arange(ra, rb) + 0.5) * ds - my,
                             x0 + (np.arange(ca, cb) + 0.5) * ds - mx, indexing="ij")
        u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
        rho, th = np.hypot(u / anis, v * anis), np.arctan2(v, u)
        edge = sc.rr * (1 + sum(ha[k] * np.cos((k + 2) * th + ha[k + 3]) for k in range(3)))
        alpha = np.clip((edge - rho) / ds + 0.5, 0, 1)
        win = (slice(ra, rb), slice(ca, cb))
        hh[win] = np.maximum(hh[win], (alpha * 2.4 * _Q).astype(np.uint8))
        ee[win] = (ee[win] * (1 - 0.6 * alpha)).astype(np.uint8)

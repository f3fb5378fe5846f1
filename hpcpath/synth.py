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

Two presets.  ``easy`` (the default; smoke tests) makes tumour obvious: any small CNN scores
tile AUC 1.0 on it.  ``hard`` is for measuring models: the stain differs from slide to slide,
tumour texture is close to stroma, blur / tissue-fold / pen-ink artefacts lie over the
tissue, dark mitosis mimics (apoptotic bodies, lymphocytes) that are *not* mitoses are
planted beside the mitoses, and :func:`make_cohort` makes some slides normal (no tumour).
The artefacts and mimics are recorded in the truth (``artefacts``, ``mimics``).
"""

from __future__ import annotations

import functools
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from hpcpath.annotations.geojson import (
    feature_collection_bytes,
    point_geometry,
    polygon_geometry,
    qupath_feature,
)
from hpcpath.files import atomic_file, write_text
from hpcpath.geometry import points_in_polygons, polygon_rings, rasterize_polygons

__all__ = ["SynthTruth", "write_synthetic_slide", "make_cohort", "load_truth",
           "pyramid_downsamples", "PRESETS", "MIMIC_KINDS", "ARTEFACT_KINDS"]

BACKGROUND = (238, 236, 240)
_Q = 80.0                      # uint8 texture units per optical density
_PERIODS = (1024, 1216)        # two periodic texture layers; combined period 19,456 px
_TEX_DS = (1, 4, 16, 64)       # texture pyramid (both periods divide by 64)
_STAIN_H = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
_STAIN_E = np.array([0.12, 0.92, 0.42]) / np.linalg.norm([0.12, 0.92, 0.42])
_LIB = "Aperio Image Library v12.0.15 "
_FONT = {  # 5x7 glyphs, one 5-bit int per row: enough for the fake identifiers
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (30, 1, 1, 14, 1, 1, 30), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "-": (0, 0, 0, 31, 0, 0, 0), "T": (31, 4, 4, 4, 4, 4, 4),
    "A": (14, 17, 17, 31, 17, 17, 17), "E": (31, 16, 16, 30, 16, 16, 31),
    "I": (14, 4, 4, 4, 4, 4, 14), "N": (17, 25, 21, 19, 17, 17, 17),
    "P": (30, 17, 17, 30, 16, 16, 16),
}


@dataclass(frozen=True)
class _Look:
    """A preset's rendering knobs; the defaults are the easy preset's (its original values)."""

    stroma_spacing: float = 28.0       # um between fibroblast nuclei (jittered grid)
    stroma_fill: float = 0.85
    lymph_share: float = 0.25          # share of stroma nuclei that are lymphocytes
    tumour_spacing: float = 9.0        # um, times sqrt(2)
    tumour_fill: float = 0.95
    tumour_major: tuple[float, float] = (4.0, 6.0)   # um semi-axes
    tumour_minor: tuple[float, float] = (3.2, 4.5)
    tumour_sigma: float = 0.22         # log-normal size spread
    tumour_od: tuple[float, float] = (0.85, 1.25)
    tumour_h: float = 0.21             # cytoplasm optical densities
    tumour_e: float = 0.13
    vesicular: float = 1.0             # share of tumour nuclei with pale centres
    tumour_on_stroma: bool = False     # tumour = stroma texture plus atypical nuclei
    tumour_e_scale: float = 1.0
    atypia_fill: float = 0.0           # tumour-like nuclei in stroma (half the density)
    stain_jitter: float = 0.0          # per-slide stain vector perturbation
    mitosis_od: float = 2.4
    artefacts: bool = False
    mimics_per_mitosis: float = 0.0


PRESETS = {
    "easy": _Look(),
    "hard": _Look(stroma_spacing=20.0, stroma_fill=0.9, lymph_share=0.35, tumour_spacing=15.0,
                  tumour_fill=0.85, tumour_major=(3.0, 4.2), tumour_minor=(2.2, 3.2),
                  tumour_sigma=0.2, tumour_od=(1.0, 1.35), tumour_h=0.04, vesicular=0.4,
                  tumour_on_stroma=True, tumour_e_scale=0.93, atypia_fill=0.3,
                  stain_jitter=0.12, mitosis_od=2.5, artefacts=True, mimics_per_mitosis=1.0),
}
MIMIC_KINDS = ("apoptotic", "lymphocyte")
ARTEFACT_KINDS = ("blur", "fold", "pen")


@dataclass(frozen=True, eq=False)
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
    downsamples: tuple[int, ...] = (1,)
    mitosis_radius_px: float = 8.0
    preset: str = "easy"
    mimics: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # not mitoses
    mimic_kinds: tuple[str, ...] = ()                                    # per mimic
    artefacts: tuple[tuple[str, np.ndarray], ...] = ()                   # (kind, polygon)


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


def _tissue(rng, w: int, h: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (blob, star-centre) pairs, one per cell of a near-square grid, each blob filling
    65-85% of its cell's box (25-45% of the slide in all)."""
    if n <= 0:
        return []
    gc = min(range(1, n + 1), key=lambda c: abs(np.log((w / c) / (h / -(-n // c))))
             + 0.6 * (c * -(-n // c) - n) / n)
    gr = -(-n // gc)
    cw, ch = w / gc, h / gr
    out = []
    for cell in sorted(rng.permutation(gr * gc)[:n]):
        p = _rotate(_star(rng, int(rng.integers(60, 201)), 0.35) * [1, rng.uniform(0.6, 1)],
                    rng.uniform(0, np.pi))
        lo, hi = p.min(0), p.max(0)
        size = np.array([cw, ch]) * rng.uniform(0.65, 0.85, 2)
        slack = np.array([cw, ch]) * 0.95 - size
        centre = (np.array([cell % gc + 0.5, cell // gc + 0.5]) * [cw, ch]
                  + rng.uniform(-0.5, 0.5, 2) * slack)
        def f(q, lo=lo, hi=hi, size=size, centre=centre):
            return (q - (lo + hi) / 2) / (hi - lo) * size + centre
        out.append((np.round(f(p), 2), f(np.zeros(2))))
    return out


def _contains(outer: np.ndarray, inner: np.ndarray) -> bool:
    """Inner vertices inside, and farther from outer's edges than inner's longest edge:
    then no edges can cross, so the inner polygon lies wholly inside."""
    longest = np.hypot(*(np.roll(inner, -1, axis=0) - inner).T).max()
    return bool(points_in_polygons(inner, [outer]).all()
                and _edge_distance(inner, [outer]).min() > longest)


def _tumours(rng, tissue, n: int) -> list[np.ndarray]:
    """The first tumour in a blob is the blob shrunk (35-60%, own wobble) about its star
    centre, which provably stays inside, then nudged if it still fits; any further tumour
    in the same blob is a smaller blob in a disc clear of edges and earlier tumours."""
    out: list[np.ndarray] = []
    for j in range(n if tissue else 0):
        host, c = tissue[j % len(tissue)]
        if j < len(tissue):
            th = np.arctan2(*(host - c).T[::-1])
            g = sum(rng.uniform(0, 0.2 / h) * np.cos(h * th + rng.uniform(0, 6.3))
                    for h in range(2, 6))
            p = c + (host - c) * (rng.uniform(0.35, 0.6) * (1 + g))[:, None]
            for scale in (0.5, 0.35, 0.2, 0.1):
                q = p + rng.uniform(-1, 1, 2) * scale * (host.max(0) - host.min(0))
                if _contains(host, q):
                    p = q
                    break
            out.append(np.round(p, 2))
            continue
        cand = rng.uniform(host.min(0), host.max(0), (600, 2))
        cand = cand[points_in_polygons(cand, [host])]
        if out:
            cand = cand[~points_in_polygons(cand, out)]
        clear = _edge_distance(cand, [host] + out)
        if len(cand) == 0 or clear.max() <= 20:
            continue
        best = np.argsort(clear)[-max(1, len(cand) // 10):]
        i = best[rng.integers(len(best))]
        p = _rotate(_star(rng, int(rng.integers(60, 161)), 0.5) * [1, rng.uniform(0.6, 1)],
                    rng.uniform(0, np.pi))
        out.append(np.round(p / np.hypot(*p.T).max() * clear[i] * rng.uniform(0.5, 0.8)
                            + cand[i], 2))
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


def _band(centre, direction, length, width, bend, taper) -> np.ndarray:
    """A gently curved stroke as a simple polygon (width small against length and bend)."""
    d = np.array([np.cos(direction), np.sin(direction)])
    n = np.array([-d[1], d[0]])
    t = np.linspace(-1, 1, 33)[:, None]
    line = centre + t * length / 2 * d + bend * length * (1 - t ** 2) * n
    w = width / 2 * (1 - taper * t ** 2)
    return np.round(np.vstack([line + w * n, (line - w * n)[::-1]]), 2)


def _artefacts(rng, blobs, w: int, h: int) -> list[tuple[str, np.ndarray]]:
    """One out-of-focus patch, one tissue fold and one pen stroke, over the tissue."""
    if not blobs:
        return []
    s = min(w, h)
    out = []
    host, c = blobs[rng.integers(len(blobs))]
    centre = (c + host[rng.integers(len(host))]) / 2
    blob = _rotate(_star(rng, 48, 0.25) * [1, rng.uniform(0.6, 1)], rng.uniform(0, np.pi))
    out.append(("blur", np.round(blob * s * rng.uniform(0.06, 0.1) + centre, 2)))
    host, c = blobs[rng.integers(len(blobs))]
    ext = (host.max(0) - host.min(0)).max()
    out.append(("fold", _band(c + rng.uniform(-0.15, 0.15, 2) * ext, rng.uniform(0, np.pi),
                              ext * rng.uniform(0.35, 0.55), s * rng.uniform(0.02, 0.035),
                              rng.uniform(-0.08, 0.08), 0.7)))
    host, c = blobs[rng.integers(len(blobs))]
    edge = host[rng.integers(len(host))]
    out.append(("pen", _band(edge, rng.uniform(0, np.pi), s * rng.uniform(0.25, 0.4),
                             s * rng.uniform(0.012, 0.02), rng.uniform(-0.1, 0.1), 0.3)))
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
    fu, fv = np.meshgrid(np.fft.rfftfreq(p), np.fft.fftfreq(p))
    along = fu * np.cos(angle) + fv * np.sin(angle)
    across = -fu * np.sin(angle) + fv * np.cos(angle)
    filt = np.exp(-(along / (0.02 / px_um)) ** 2 - (across / (0.15 / px_um)) ** 2)
    out = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(p, p))) * filt, s=(p, p))
    return out / out.std()


def _blurred(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur (FFT): the layer stays seamless."""
    p = arr.shape[0]
    fu, fv = np.meshgrid(np.fft.rfftfreq(p), np.fft.fftfreq(p))
    filt = np.exp(-2 * (np.pi * sigma) ** 2 * (fu ** 2 + fv ** 2))
    return np.fft.irfft2(np.fft.rfft2(arr) * filt, s=(p, p))


@functools.lru_cache(maxsize=4)
def _textures(seed: int, mpp: float, tile: int, look: _Look = PRESETS["easy"]) -> dict:
    """Periodic stain-density layers per period and level, padded by one tile for slicing.

    Stroma: eosin fibres with sparse elongated fibroblasts and a few lymphocytes.  Tumour:
    crowded, large, pleomorphic vesicular nuclei on purple-ish cytoplasm.  Two periods whose
    least common multiple is ~19k px hide the repetition; lower levels are block means.
    With artefacts, each layer also has a blurred twin (``name + "~"``) for blur regions.
    """
    um = 1.0 / mpp  # pixels per micrometre
    tex: dict = {}
    for p in _PERIODS:
        rng = np.random.default_rng([seed, 11, p])
        ang = rng.uniform(0, np.pi)
        fib = _fibres(rng, p, ang, um) + 0.6 * _fibres(rng, p, ang + rng.uniform(0.4, 1.2), um)
        low = _fibres(rng, p, 0.0, um / 12)
        layers = {
            "sE": 0.165 + 0.07 * fib + 0.03 * low + rng.normal(0, 0.02, (p, p)),
            "sH": 0.03 + rng.normal(0, 0.01, (p, p)),
            "tE": look.tumour_e + 0.03 * low + rng.normal(0, 0.025, (p, p)),
            "tH": look.tumour_h + 0.04 * low + rng.normal(0, 0.03, (p, p)),
        }  # optical densities; quantised and clipped below
        if look.tumour_on_stroma:  # tumour cells infiltrating stroma: its fibres show
            layers["tE"] = layers["sE"] * look.tumour_e_scale + rng.normal(0, 0.01, (p, p))
            layers["tH"] = layers["sH"] + look.tumour_h

        def fibro(r, ang=ang):
            if r.random() < look.lymph_share:  # lymphocyte: small, round, dark
                return _nucleus(r, 3.5 * um / 2, 3.3 * um / 2, 0, 0.08, 1.5)
            return _nucleus(r, r.uniform(5, 8) * um / 2, r.uniform(1.4, 2.2) * um / 2,
                            ang + r.normal(0, 0.25), 0.1, 1.1)

        def tumour(r):
            k = r.lognormal(0, look.tumour_sigma)
            return _nucleus(r, k * r.uniform(*look.tumour_major) * um,
                            k * r.uniform(*look.tumour_minor) * um,
                            r.uniform(0, np.pi), 0.18, r.uniform(*look.tumour_od),
                            vesicular=r.random() < look.vesicular)

        _stamp_nuclei(rng, layers["sH"], look.stroma_spacing * um, look.stroma_fill, fibro)
        if look.tumour_on_stroma:
            _stamp_nuclei(rng, layers["tH"], look.stroma_spacing * um, look.stroma_fill, fibro)
        _stamp_nuclei(rng, layers["tH"], look.tumour_spacing * um * 1.4142, look.tumour_fill,
                      tumour)
        if look.atypia_fill:  # reactive stroma: a few tumour-like nuclei outside tumour
            _stamp_nuclei(rng, layers["sH"], look.tumour_spacing * um * 1.4142 * 2,
                          look.atypia_fill, tumour)
        layers["tE"] *= np.clip(1 - layers["tH"], 0.3, 1)
        if look.artefacts:  # out-of-focus twins: blur of ~2.5 um
            layers.update({k + "~": _blurred(v, 2.5 * um) for k, v in list(layers.items())})
        for name, arr in layers.items():
            top = 127 if name.rstrip("~").endswith("E") else 255
            arr = np.clip(arr * _Q, 0, top).astype(np.float32)
            for d in _TEX_DS:
                pd = p // d
                lv = arr.reshape(pd, d, pd, d).mean((1, 3)) if d > 1 else arr
                reps = -(-(pd + tile) // pd)
                tex[name, p, d] = np.tile(np.round(lv).astype(np.uint8), (reps, reps))[
                    :pd + tile, :pd + tile]
    return tex


def _pack(rgb: np.ndarray) -> np.ndarray:
    """RGB as one little-endian uint32 per pixel: one take/where per pixel, not three."""
    rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint32)
    return rgb[..., 0] | rgb[..., 1] << 8 | rgb[..., 2] << 16


def _stains(seed: int, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """The slide's haematoxylin and eosin OD vectors: the reference ones, or (``jitter``)
    turned and scaled per slide, as stain batches and scanners differ."""
    if not jitter:
        return _STAIN_H, _STAIN_E
    r = np.random.default_rng([seed, 15])
    h = _STAIN_H + r.normal(0, jitter, 3)
    e = _STAIN_E + r.normal(0, jitter, 3)
    h, e = np.abs(h) / np.linalg.norm(h), np.abs(e) / np.linalg.norm(e)
    return h * r.uniform(0.75, 1.3), e * r.uniform(0.7, 1.35)


@functools.lru_cache(maxsize=4)
def _background(seed: int, tile: int, jitter: float = 0.0) -> dict:
    """Glass noise (sampled in level coordinates) and the (H, E) -> RGB Beer-Lambert table."""
    noise = np.random.default_rng([seed, 12]).normal(0, 1.2, (1024, 1024, 3))
    bg = _pack(np.array(BACKGROUND) + noise)
    h, e = np.meshgrid(np.arange(256) / _Q, np.arange(256) / _Q, indexing="ij")
    stain_h, stain_e = _stains(seed, jitter)
    od = h[..., None] * stain_h + e[..., None] * stain_e
    return {("bg", 1024, 1): np.tile(bg, (2, 2))[:1024 + tile, :1024 + tile],
            "lut": _pack(np.array(BACKGROUND) * np.exp(-od)).reshape(-1)}


def _sample(tex, name, p, x0, y0, ds, rows, cols):
    """Window of a periodic layer: a slice on pyramid levels, nearest-neighbour otherwise."""
    fast = (name, p, ds) in tex and x0 % ds == 0 and y0 % ds == 0
    if fast and max(rows, cols) <= tex[name, p, ds].shape[0] - p // ds:
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
    look: _Look = PRESETS["easy"]
    mimics: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    mimic_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    mimic_shape: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    art: dict = field(default_factory=dict)   # kind -> (polygons, boxes)
    pen_tint: np.ndarray = field(default_factory=lambda: np.ones(3))


_PEN_INKS = np.array([[0.30, 0.45, 0.85], [0.40, 0.75, 0.45], [0.32, 0.32, 0.38]])  # RGB kept


def _boxes(polys) -> np.ndarray:
    return np.array([[*p.min(0), *p.max(0)] for p in polys]).reshape(-1, 4)


def _scene(truth_parts, seed, mpp, tile, rr, look: _Look = PRESETS["easy"],
           mimics=None, mimic_kinds=(), artefacts=()) -> _Scene:
    tissue, tumour, mitoses = truth_parts
    polys = tissue + tumour
    boxes = _boxes(polys)
    rng = np.random.default_rng([seed, 13])
    mshape = np.c_[rng.uniform(1.0, 1.5, len(mitoses)), rng.uniform(0, np.pi, (len(mitoses), 1)),
                   rng.uniform(0, 0.15, (len(mitoses), 3)), rng.uniform(0, 6.3, (len(mitoses), 3))]
    tex = {**_background(seed, tile, look.stain_jitter),
           **(_textures(seed, mpp, tile, look) if polys else {})}
    sc = _Scene(tex, polys, [1] * len(tissue) + [2] * len(tumour),
                boxes, mitoses.reshape(-1, 2), mshape, rr, look)
    if mimics is not None and len(mimics):
        r = np.random.default_rng([seed, 17])
        kind = np.array([MIMIC_KINDS.index(k) for k in mimic_kinds])
        n = len(kind)
        size = np.where(kind == 0, r.uniform(0.5, 0.7, n), r.uniform(0.4, 0.55, n))
        sc.mimics, sc.mimic_kind = np.asarray(mimics, np.float64).reshape(-1, 2), kind
        sc.mimic_shape = np.c_[size * rr, r.uniform(1.0, 1.12, n), r.uniform(0, np.pi, n),
                               r.uniform(0, 0.06, n), r.uniform(0, 6.3, n)]
    for k in ARTEFACT_KINDS:
        ps = [p for kind, p in artefacts if kind == k]
        if ps:
            sc.art[k] = (ps, _boxes(ps))
    if "pen" in sc.art:
        sc.pen_tint = _PEN_INKS[np.random.default_rng([seed, 18]).integers(len(_PEN_INKS))]
    return sc


def _art_mask(sc: _Scene, kind: str, x0, y0, ds, rows, cols):
    """Where artefact ``kind`` covers the window (None: nowhere near)."""
    if kind not in sc.art:
        return None
    polys, b = sc.art[kind]
    x1, y1 = x0 + cols * ds, y0 + rows * ds
    hit = np.flatnonzero((b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0))
    if not len(hit):
        return None
    m = rasterize_polygons([polys[i] for i in hit], (rows, cols), origin=(x0, y0),
                           downsample=ds).astype(bool)
    return m if m.any() else None


def _render(sc: _Scene, x0: float, y0: float, ds: float, rows: int, cols: int) -> np.ndarray:
    """RGB window whose pixel (r, c) shows the scene at level-0 centre (x0+(c+.5)ds, ...)."""
    t = sc.tex
    bg = _sample(t, "bg", 1024, x0 / ds, y0 / ds, 1, rows, cols)  # noise at any level
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
        def stains(kind, twin=""):  # nuclei of the two layers overlap (max); eosin adds up
            (ha, ea), (hb, eb) = ((_sample(t, kind + "H" + twin, p, x0, y0, ds, rows, cols),
                                   _sample(t, kind + "E" + twin, p, x0, y0, ds, rows, cols))
                                  for p in _PERIODS)
            return np.maximum(ha, hb), ea + eb

        def layers(twin=""):
            hh, ee = stains("s", twin)
            if tum.any():
                th, te = stains("t", twin)
                hh, ee = np.where(tum, th, hh), np.where(tum, te, ee)
            return hh, ee

        tum = region == 2
        hh, ee = layers()
        blur = _art_mask(sc, "blur", x0, y0, ds, rows, cols)
        if blur is not None:  # out of focus: the blurred twins of the texture layers
            bh, be = layers("~")
            hh, ee = np.where(blur, bh, hh), np.where(blur, be, ee)
        _draw_mitoses(sc, hh, ee, x0, y0, ds)
        _draw_mimics(sc, hh, ee, x0, y0, ds)
        fold = _art_mask(sc, "fold", x0, y0, ds, rows, cols)
        if fold is not None:  # tissue folded over itself: twice the stain
            hh = np.where(fold, np.minimum(hh * 2.0, 255), hh).astype(np.uint8)
            ee = np.where(fold, np.minimum(ee * 1.9, 255), ee).astype(np.uint8)
        rgb = t["lut"].take((hh.astype(np.uint16) << 8) | ee)
        packed = np.where(region > 0, rgb, bg)
    out = np.ascontiguousarray(packed.view(np.uint8).reshape(rows, cols, 4)[..., :3])
    pen = _art_mask(sc, "pen", x0, y0, ds, rows, cols)
    if pen is not None:  # marker ink over tissue and glass alike
        out[pen] = np.round(out[pen] * sc.pen_tint).astype(np.uint8)
    return out


def _around(centres, m, shape, x0, y0, ds):
    """Each centre within ``m`` level-0 px of this block: ``(index, window, dx, dy)``, with
    ``dx, dy`` the level-0 offsets of the window's pixel centres from that centre."""
    if not len(centres):
        return
    rows, cols = shape
    near = np.flatnonzero((centres[:, 0] > x0 - m) & (centres[:, 0] < x0 + cols * ds + m)
                          & (centres[:, 1] > y0 - m) & (centres[:, 1] < y0 + rows * ds + m))
    for i in near:
        mx, my = centres[i]
        ra, rb = max(0, int((my - m - y0) / ds)), min(rows, int((my + m - y0) / ds) + 2)
        ca, cb = max(0, int((mx - m - x0) / ds)), min(cols, int((mx + m - x0) / ds) + 2)
        if ra >= rb or ca >= cb:
            continue
        dy, dx = np.meshgrid(y0 + (np.arange(ra, rb) + 0.5) * ds - my,
                             x0 + (np.arange(ca, cb) + 0.5) * ds - mx, indexing="ij")
        yield i, (slice(ra, rb), slice(ca, cb)), dx, dy


def _polar(dx, dy, ang, anis):
    """Radius and angle in a frame turned by ``ang`` and stretched by ``anis`` (blob shapes)."""
    u, v = dx * np.cos(ang) + dy * np.sin(ang), -dx * np.sin(ang) + dy * np.cos(ang)
    return np.hypot(u / anis, v * anis), np.arctan2(v, u)


def _draw_mitoses(sc: _Scene, hh, ee, x0, y0, ds):
    """Very dark compact irregular blobs, drawn analytically so every level agrees."""
    for i, win, dx, dy in _around(sc.mitoses, sc.rr * 1.6, hh.shape, x0, y0, ds):
        anis, ang, *ha = sc.mshape[i]
        rho, th = _polar(dx, dy, ang, anis)
        edge = sc.rr * (1 + sum(ha[k] * np.cos((k + 2) * th + ha[k + 3]) for k in range(3)))
        alpha = np.clip((edge - rho) / ds + 0.5, 0, 1)
        hh[win] = np.maximum(hh[win], (alpha * sc.look.mitosis_od * _Q).astype(np.uint8))
        ee[win] = (ee[win] * (1 - 0.6 * alpha)).astype(np.uint8)


def _draw_mimics(sc: _Scene, hh, ee, x0, y0, ds):
    """Dark round bodies that are not mitoses: apoptotic bodies (dense, smaller, in a clear
    eosinophilic halo) and lymphocytes (small, round, a little less dark)."""
    for i, win, dx, dy in _around(sc.mimics, sc.rr * 1.6, hh.shape, x0, y0, ds):
        rad, anis, ang, h3, p3 = sc.mimic_shape[i]
        rho, th = _polar(dx, dy, ang, anis)
        edge = rad * (1 + h3 * np.cos(3 * th + p3))
        alpha = np.clip((edge - rho) / ds + 0.5, 0, 1)
        h, e = hh[win].astype(np.float32), ee[win].astype(np.float32)
        if sc.mimic_kind[i] == 0:
            halo = np.clip((1.8 * edge - rho) / ds + 0.5, 0, 1) - alpha
            h = np.maximum(h * (1 - 0.85 * halo), alpha * 2.2 * _Q)
            e = e * (1 - 0.5 * alpha) * (1 - 0.3 * halo) + halo * 0.35 * _Q
        else:
            h = np.maximum(h, alpha * 1.9 * _Q)
            e = e * (1 - 0.5 * alpha)
        hh[win] = np.clip(h, 0, 255).astype(np.uint8)
        ee[win] = np.clip(e, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing
_atomic = atomic_file  # a killed run leaves no half file
_write_text = write_text


def _text(img: np.ndarray, s: str, y: int, x: int, scale: int) -> None:
    for k, ch in enumerate(s):
        rows = np.array(_FONT.get(ch, (0,) * 7))
        bits = (rows[:, None] >> np.arange(4, -1, -1)) & 1
        block = np.kron(bits, np.ones((scale, scale), dtype=int)).astype(bool)
        xx = x + k * 6 * scale
        img[y:y + 7 * scale, xx:xx + 5 * scale][block] = 20


def _label(seed: int, text: str) -> np.ndarray:
    """A slide label (463 x 387 like Aperio): fake 2-D barcode plus the identifier text."""
    img = np.full((463, 387, 3), 248, dtype=np.uint8)
    code = np.random.default_rng([seed, 14]).random((12, 12)) < 0.5
    img[40:40 + 240, 73:73 + 240][np.kron(code, np.ones((20, 20), dtype=int)).astype(bool)] = 20
    _text(img, text, 330, (387 - (len(text) * 6 - 1) * 5) // 2, 5)
    return img


def _nearest(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    iy = (np.arange(rows) * img.shape[0] / rows).astype(int)
    ix = (np.arange(cols) * img.shape[1] / cols).astype(int)
    return img[np.ix_(iy, ix)]


def _macro(label: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """Photo of the whole glass slide (1280 x 431): the label on the left, the tissue right."""
    img = np.full((431, 1280, 3), 205, dtype=np.uint8)
    img[20:411, 20:347] = _nearest(np.rot90(label), 391, 327)
    k = min(391 / thumb.shape[0], 873 / thumb.shape[1])
    th, tw = max(1, int(thumb.shape[0] * k)), max(1, int(thumb.shape[1] * k))
    img[20:20 + th, 387:387 + tw] = _nearest(thumb, th, tw)
    return img


def _tiles(render, ds: int, lw: int, lh: int, tile: int):
    """Level tiles in TIFF order, each rendered on its own from level-0 coordinates."""
    for ty in range(-(-lh // tile)):
        for tx in range(-(-lw // tile)):
            yield render(tx * tile * ds, ty * tile * ds, ds)


def _write_slide(path, sc, w, h, mpp, tile, quality, dss, phi, seed, maxworkers):
    """Aperio page order: level 0, stripped thumbnail, lower levels, label, macro."""
    mag = round(10 / mpp)
    fields = (f"|AppMag = {mag}|StripeWidth = 2040|ScanScope ID = SS9999|Filename = {phi[0]}"
              f"|Date = 01/01/26|Time = 09:30:00|Time Zone = GMT+00:00|User = {phi[1]}"
              f"|MPP = {mpp}|Left = 25.0|Top = 17.5|OriginalWidth = {w}|OriginalHeight = {h}")
    jpeg = dict(photometric="rgb", compression="jpeg", metadata=None, maxworkers=maxworkers,
                compressionargs={"level": quality, "outcolorspace": "rgb"}, subsampling=(1, 1),
                resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    k = min(1.0, 768 / h, 1024 / w)  # Aperio: 768 px high; keep very wide slides small
    th, tw = max(1, round(h * k)), max(1, round(w * k))
    thumb = _render(sc, 0, 0, 1 / k, th, tw)
    label = _label(seed, phi[0])
    with tifffile.TiffWriter(path, bigtiff=w * h * 3 > 2**32) as tw_:
        for i, d in enumerate(dss):
            lw, lh = w // d, h // d
            desc = (f"{_LIB}\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}{fields}"
                    if d == 1 else
                    f"{_LIB}\r\n{w}x{h} ({tile}x{tile}) -> {lw}x{lh} JPEG/RGB Q={quality}")
            tiles = _tiles(lambda x, y, d: _render(sc, x, y, d, tile, tile), d, lw, lh, tile)
            tw_.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile),
                      description=desc, **jpeg)
            if i == 0:
                tw_.write(thumb, description=f"{_LIB}\n{w}x{h} -> {tw}x{th} - {fields}",
                          rowsperstrip=16, **jpeg)
        tw_.write(label, photometric="rgb", compression="lzw", subfiletype=1, metadata=None,
                  description=f"{_LIB}\nlabel {label.shape[1]}x{label.shape[0]}")
        macro = _macro(label, thumb)
        tw_.write(macro, subfiletype=9, rowsperstrip=16,
                  description=f"{_LIB}\nmacro {macro.shape[1]}x{macro.shape[0]}", **jpeg)


def _write_mask(path, tumour, w, h, mpp, tile, dss):
    """CAMELYON16-style uint8 tumour mask (1 = tumour), deflate tiles, same pyramid."""
    with tifffile.TiffWriter(path, bigtiff=w * h > 2**32) as tw_:
        for d in dss:
            lw, lh = w // d, h // d
            tiles = _tiles(lambda x, y, d: rasterize_polygons(
                tumour, (tile, tile), origin=(x, y), downsample=d), d, lw, lh, tile)
            tw_.write(tiles, shape=(lh, lw), dtype=np.uint8, tile=(tile, tile),
                      photometric="minisblack", compression="zlib", metadata=None,
                      subfiletype=0 if d == 1 else 1, resolutionunit="CENTIMETER",
                      resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)))


def _asap(tumour) -> str:
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, p in enumerate(tumour):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                          PartOfGroup="Tumor", Color="#F4FA58")
        cs = ET.SubElement(a, "Coordinates")
        for k, (x, y) in enumerate(p):
            ET.SubElement(cs, "Coordinate", Order=str(k), X=f"{x:.4f}", Y=f"{y:.4f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    g = ET.SubElement(groups, "Group", Name="Tumor", PartOfGroup="None", Color="#ff0000")
    ET.SubElement(g, "Attributes")
    ET.indent(root, "\t")
    return '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _sidecars(truth: SynthTruth) -> None:
    f = truth.files
    sid = truth.slide.stem  # QuPath objects (hpcpath.annotations.geojson): ids from the slide
    regions = [("Tumor", (200, 0, 0), p) for p in truth.tumour] + [("Tissue", (80, 160, 80), p) for p in truth.tissue]
    feats = [qupath_feature(polygon_geometry([p]), name, col, key=f"{sid}/{name}/{i}")
             for i, (name, col, p) in enumerate(regions)]
    _write_text(f["tumor_geojson"], feature_collection_bytes(feats).decode())
    _write_text(f["tumor_xml"], _asap(truth.tumour))
    _write_text(f["mitoses_csv"], "x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in truth.mitoses))
    pts = [qupath_feature(point_geometry(x, y), "Mitosis", (255, 200, 0), key=f"{sid}/Mitosis/{i}")
           for i, (x, y) in enumerate(truth.mitoses)]
    _write_text(f["mitoses_geojson"], feature_collection_bytes(pts).decode())
    extra = {} if truth.preset == "easy" else {
        "preset": truth.preset, "mimics": truth.mimics.tolist(),
        "mimic_kinds": list(truth.mimic_kinds),
        "artefacts": [{"kind": k, "polygon": p.tolist()} for k, p in truth.artefacts]}
    doc = {"width": truth.width, "height": truth.height, "mpp": truth.mpp, "seed": truth.seed,
           "tile": truth.tile, "downsamples": list(truth.downsamples), "phi": list(truth.phi),
           "mitosis_radius_px": truth.mitosis_radius_px, "slide": truth.slide.name,
           "files": {k: v.name for k, v in f.items()},
           "tissue": [p.tolist() for p in truth.tissue],
           "tumour": [p.tolist() for p in truth.tumour], "mitoses": truth.mitoses.tolist(),
           **extra}
    _write_text(f["truth"], json.dumps(doc))


def _sidecar_paths(slide: Path) -> dict[str, Path]:
    base = slide.with_suffix("")
    names = {"tumor_mask": ".tumor.tif", "tumor_geojson": ".tumor.geojson",
             "tumor_xml": ".tumor.xml", "mitoses_csv": ".mitoses.csv",
             "mitoses_geojson": ".mitoses.geojson", "truth": ".truth.json"}
    return {k: base.with_name(base.name + v) for k, v in names.items()}


def write_synthetic_slide(path, width: int = 8192, height: int = 8192, *, seed: int = 0,
                          mpp: float = 0.5, tile: int = 256, quality: int = 90,
                          n_tissue: int = 3, n_tumour: int = 2, n_mitoses: int = 40,
                          mitosis_radius_um: float = 4.0, blank: bool = False,
                          preset: str = "easy", maxworkers: int | None = None) -> SynthTruth:
    """Write ``<stem>.svs`` plus its ground-truth sidecars; return the truth.

    Memory stays flat at any size: every page is streamed tile by tile to tifffile.
    ``maxworkers`` is passed to tifffile's JPEG encoder threads (None: tifffile decides).
    ``preset``: ``easy`` or ``hard`` (module docstring); ``n_tumour=0`` makes a normal slide.
    """
    if width < 1 or height < 1 or tile < 16 or tile % 16 or mpp <= 0:
        raise ValueError("width/height must be positive, tile a multiple of 16, mpp > 0")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    look = PRESETS[preset]
    path = Path(path).with_suffix(".svs")
    path.parent.mkdir(parents=True, exist_ok=True)
    mpp = float(mpp)
    rng = np.random.default_rng([seed, 10])
    rr = mitosis_radius_um / mpp
    blobs = [] if blank else _tissue(rng, width, height, n_tissue)
    tissue = [b for b, _ in blobs]
    tumour = _tumours(rng, blobs, n_tumour)
    n_in = round(0.75 * n_mitoses) if tumour else 0
    pts = _points(rng, n_in, tumour, [], tumour, rr, [])
    pts += _points(rng, n_mitoses - len(pts), tissue, tumour, tissue + tumour, rr, pts)
    mitoses = np.array(pts, dtype=np.float64).reshape(-1, 2)
    art, mimics = [], np.zeros((0, 2))
    kinds: tuple[str, ...] = ()
    if look.artefacts:
        art = _artefacts(np.random.default_rng([seed, 16]), blobs, width, height)
    if look.mimics_per_mitosis and tissue:
        r = np.random.default_rng([seed, 19])
        n_mim = round(look.mimics_per_mitosis * max(n_mitoses, len(mitoses)))
        got = _points(r, n_mim, tissue, [], tissue, rr, [tuple(p) for p in mitoses])
        mimics = np.array(got, dtype=np.float64).reshape(-1, 2)
        kinds = tuple(MIMIC_KINDS[k] for k in r.integers(0, 2, len(mimics)))
    dss = pyramid_downsamples(width, height, tile)
    phi = (f"PATIENT-{seed % 10000 + 1:04d}", f"jdoe{seed % 10000 + 1:04d}")
    truth = SynthTruth(path, width, height, mpp, tissue, tumour, mitoses,
                       _sidecar_paths(path), seed, tile, phi, tuple(dss), rr, preset, mimics,
                       kinds, tuple(art))
    sc = _scene((tissue, tumour, mitoses), seed, mpp, tile, rr, look, mimics, kinds, art)
    with _atomic(path) as tmp:
        _write_slide(tmp, sc, width, height, mpp, tile, quality, dss, phi, seed, maxworkers)
    with _atomic(truth.files["tumor_mask"]) as tmp:
        _write_mask(tmp, tumour, width, height, mpp, tile, dss)
    _sidecars(truth)
    return truth


def make_cohort(out_dir, n: int = 4, width: int = 8192, height: int = 8192, seed: int = 0,
                *, preset: str = "easy", normal: int | None = None, **kw) -> list[SynthTruth]:
    """``slide_000.svs`` ... with seeds ``seed + i``: a small multi-slide, multi-patient set.

    The last ``normal`` slides have no tumour (and a quarter of the mitoses, all in stroma),
    so slide-level scores can be judged; default none for ``easy``, a third for ``hard``.
    """
    out = Path(out_dir)
    if normal is None:
        normal = 0 if preset == "easy" else max(1, n // 3) if n > 1 else 0
    if not 0 <= normal <= n:
        raise ValueError(f"normal must be between 0 and {n}, got {normal}")
    out_list = []
    for i in range(n):
        args = dict(kw, preset=preset)
        if i >= n - normal:
            args.update(n_tumour=0, n_mitoses=kw.get("n_mitoses", 40) // 4)
        out_list.append(write_synthetic_slide(out / f"slide_{i:03d}.svs", width, height,
                                              seed=seed + i, **args))
    return out_list


def load_truth(path) -> SynthTruth:
    """Reload the truth from ``<stem>.truth.json`` (or from the ``.svs`` next to it)."""
    path = Path(path)
    if not path.name.endswith(".truth.json"):
        path = _sidecar_paths(path.with_suffix(".svs"))["truth"]
    doc = json.loads(path.read_text(encoding="utf-8"))
    d = path.parent
    return SynthTruth(d / doc["slide"], doc["width"], doc["height"], doc["mpp"],
                      [np.array(p, dtype=np.float64) for p in doc["tissue"]],
                      [np.array(p, dtype=np.float64) for p in doc["tumour"]],
                      np.array(doc["mitoses"], dtype=np.float64).reshape(-1, 2),
                      {k: d / v for k, v in doc["files"].items()}, doc["seed"], doc["tile"],
                      tuple(doc["phi"]), tuple(doc["downsamples"]), doc["mitosis_radius_px"],
                      doc.get("preset", "easy"),
                      np.array(doc.get("mimics", []), dtype=np.float64).reshape(-1, 2),
                      tuple(doc.get("mimic_kinds", ())),
                      tuple((a["kind"], np.array(a["polygon"], dtype=np.float64))
                            for a in doc.get("artefacts", ())))

"""OME-NGFF 0.5 (Zarr v3) metadata, and the heatmap layers that overlay a slide's pyramid.

Viewers (napari with napari-ome-zarr, any ome-zarr-py reader) place every array by its
``coordinateTransformations``.  World units are micrometres (the slide's MPP; level-0 pixels
when it has none), with the pixel-centre convention napari and the NGFF transformation spec
use: the centre of level-0 pixel ``(x, y)`` is at ``(x * mpp_x, y * mpp_y)``.  A pixel that
stands for ``s x s`` level-0 pixels starting at level-0 ``x0`` therefore has scale
``s * mpp`` and translation ``(x0 + (s - 1) / 2) * mpp``.

A heatmap holds one value per sliding window (:mod:`hpcpath.grid`): window ``(r, c)`` covers
level-0 ``[c * step, c * step + side)``, so heatmap pixel ``(r, c)`` gets scale ``step`` and
translation ``(side - 1) / 2`` (level-0 pixels, times the MPP): its centre is the window's
centre and, for non-overlapping windows, its extent is exactly the window.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "NGFF_VERSION",
    "class_colors",
    "heatmap_levels",
    "label_image",
    "multiscales",
    "write_heatmap_layers",
]

NGFF_VERSION = "0.5"
RGB_CHANNELS = (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
_LEVEL_MIN = 16  # heatmap levels halve until the longer side is at most this many windows
_CHUNK = 1024
# QuPath's default class colours, so a class looks the same in QuPath and napari; others
# take the palette in class order
_QUPATH = {"tumor": (200, 0, 0), "tumour": (200, 0, 0), "stroma": (150, 200, 150),
           "immune cells": (160, 90, 160), "necrosis": (50, 50, 50), "other": (255, 200, 0),
           "region*": (0, 0, 180), "ignore*": (180, 180, 180), "positive": (200, 50, 50),
           "negative": (112, 112, 225)}
_PALETTE = ((255, 200, 0), (0, 160, 255), (0, 200, 80), (230, 0, 160), (140, 80, 0),
            (120, 0, 220), (0, 200, 200), (255, 120, 0))


def multiscales(name: str, scales: Sequence[float], mpp: Sequence[float] | None, *,
                offsets: Sequence[float] | None = None,
                channels: Sequence[tuple[str, str]] | None = RGB_CHANNELS,
                window: tuple[float, float] = (0, 255)) -> dict[str, Any]:
    """``attributes["ome"]`` of a ``(c, y, x)`` multiscale image whose level ``i`` pixel stands
    for ``scales[i]`` level-0 pixels; its centre sits ``offsets[i]`` level-0 pixels right of
    and below the level-0 pixel it starts at (default ``(s - 1) / 2``: a block average).
    ``channels`` (label, hex colour) become ``omero`` display settings (None: none)."""
    mx, my = (float(mpp[0]), float(mpp[1])) if mpp else (1.0, 1.0)
    space = {"type": "space", **({"unit": "micrometer"} if mpp else {})}
    offs = [(s - 1) / 2 for s in scales] if offsets is None else list(offsets)
    doc: dict[str, Any] = {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "c", "type": "channel"}, {"name": "y", **space}, {"name": "x", **space}],
            "datasets": [
                {"path": str(i), "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, my * s, mx * s]},
                    {"type": "translation", "translation": [0.0, my * o, mx * o]},
                ]}
                for i, (s, o) in enumerate(zip(scales, offs))
            ],
        }],
    }
    if channels:
        lo, hi = window
        doc["omero"] = {
            "channels": [{"label": c, "color": col, "active": True,
                          "window": {"start": lo, "end": hi, "min": lo, "max": hi}}
                         for c, col in channels],
            "rdefs": {"model": "color"},
        }
    return doc


def class_colors(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """One RGB colour per class: QuPath's default for its class names (Tumor, Stroma, ...),
    else a fixed palette by class position.  GeoJSON and NGFF labels use the same."""
    return [_QUPATH.get(c.strip().lower(), _PALETTE[i % len(_PALETTE)]) for i, c in enumerate(classes)]


def _half(a: np.ndarray) -> np.ndarray:
    """2x2 NaN-mean of a (c, h, w) float array; an odd last row/column averages alone."""
    c, h, w = a.shape
    p = np.full((c, h + h % 2, w + w % 2), np.nan, np.float32)
    p[:, :h, :w] = a
    blocks = p.reshape(c, p.shape[1] // 2, 2, p.shape[2] // 2, 2)
    with warnings.catch_warnings():  # all-NaN blocks stay NaN (no window there)
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(blocks, axis=(2, 4)).astype(np.float32)


def heatmap_levels(heat: np.ndarray, n: int | None = None, min_side: int = _LEVEL_MIN) -> list[np.ndarray]:
    """The heatmap, then 2x2 NaN-means: ``n`` levels in all, or (``n`` None) until the longer
    side is at most ``min_side``."""
    levels = [np.asarray(heat, np.float32)]
    while (len(levels) < n) if n is not None else (max(levels[-1].shape[1:]) > min_side):
        levels.append(_half(levels[-1]))
    return levels


def label_image(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(1, h, w) integer labels of (C, h, w) probabilities: 1 + the most probable class
    where its probability is at least ``threshold``, 0 elsewhere and where nothing was
    predicted (NaN)."""
    p = np.nan_to_num(np.asarray(probs, np.float32), nan=-1.0)
    best = p.argmax(axis=0)
    top = np.take_along_axis(p, best[None], 0)[0]
    dtype = np.uint8 if p.shape[0] < 255 else np.uint16
    return np.where(top >= threshold, best + 1, 0).astype(dtype)[None]


def _array(group, path: str, data: np.ndarray) -> None:
    from hpcpath.codecs import array_codecs

    c, h, w = data.shape
    group.create_array(path, data=data, chunks=(c, max(1, min(h, _CHUNK)), max(1, min(w, _CHUNK))),
                       dimension_names=["c", "y", "x"], overwrite=True,
                       **array_codecs("blosc-lz4"))


def write_heatmap_layers(root, group, name: str, classes: Sequence[str], *, step: float,
                         side: float, mpp: Sequence[float] | None, threshold: float) -> int:
    """Make ``group`` (``predictions/<name>``, holding ``heatmap`` (C, rows, cols)) an
    OME-NGFF image: ``heatmap`` is level 0, ``heatmap_<k>`` level k (2^k windows a pixel),
    float probabilities, one channel per class; and, when the store has its ``image``
    pyramid, ``image/labels/<name>``: the NGFF label image (1 + class where it is at least
    ``threshold``), colours and class names in ``image-label``, with as many levels as the
    image (the labels spec's MUST).  Both are placed on the slide's level-0 pixels (module
    docstring).  Returns the number of levels (0: no windows, nothing written)."""
    heat = group["heatmap"]
    if heat.size == 0:
        return 0
    image = root.get("image")
    n = len(image.attrs["ome"]["multiscales"][0]["datasets"]) if image is not None else None
    levels = heatmap_levels(heat[:], n)
    for k, lev in enumerate(levels[1:], 1):
        _array(group, f"heatmap_{k}", lev)
    scales = [step * 2**k for k in range(len(levels))]
    offsets = [(side - 1) / 2 + (2**k - 1) / 2 * step for k in range(len(levels))]
    colors = class_colors(classes)
    hexes = ["".join(f"{v:02X}" for v in col) for col in colors]
    ome = multiscales(name, scales, mpp, offsets=offsets, channels=list(zip(classes, hexes)),
                      window=(0.0, 1.0))
    for k, ds in enumerate(ome["multiscales"][0]["datasets"]):
        ds["path"] = "heatmap" if k == 0 else f"heatmap_{k}"
    group.attrs["ome"] = ome
    if image is None:
        return len(levels)
    labels = image.require_group("labels")
    names = list(labels.attrs.get("ome", {}).get("labels", []))
    lab = labels.require_group(name)
    for k, lev in enumerate(levels):
        _array(lab, str(k), label_image(lev, threshold))
    ome = multiscales(name, scales, mpp, offsets=offsets, channels=None)
    ome["image-label"] = {
        "colors": [{"label-value": i + 1, "rgba": [*col, 255]} for i, col in enumerate(colors)],
        "properties": [{"label-value": i + 1, "class": c} for i, c in enumerate(classes)],
        "source": {"image": "../../"},
    }
    lab.attrs["ome"] = ome
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": sorted({*names, name})}
    return len(levels)

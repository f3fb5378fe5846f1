"""Labelling rules: from annotation rasters and points to per-patch labels, and from labels to
balanced, leak-free training sets.  Pure numpy (scipy for nearest-point queries).

Coordinates are level-0 pixels; a box is ``(x, y, w, h)`` with ``(x, y)`` its top-left
corner, as in ``tiles/index``.  A label raster (``mask``) has pixel ``(r, c)`` covering
level-0 ``(c * sx, r * sy)`` onwards, ``(sx, sy) = mask_downsample`` — what
:meth:`AnnotationSet.rasterize` and :meth:`MaskAnnotation.read_region` return with
origin ``(0, 0)``.

The rules:

* **region fraction** — the fraction of annotated mask pixels among those whose *centres*
  lie in the box: exactly :func:`hpcpath.tissue.tile_tissue_fraction` (same summed-area
  table, same centre rule and fallback for boxes narrower than a mask pixel).
* **centre label** — a patch is positive when any annotated pixel lies in its central
  square, i.e. the region fraction of the central box is > 0.  CAMELYON16 multi-scale
  training (e.g. window 80 px, centre 50 px at the patch's own resolution) is
  ``centre_fraction = 50 / 80``; ``1.0`` means "any annotated pixel in the patch".  A mask
  read from a TIFF and polygons rasterised at the same downsample give the same pixels, so
  they give the same labels.
* **points** — positives are patches centred within ``jitter`` of an annotated point;
  negatives are candidates at least ``D`` from every point, ``D`` given at a reference
  resolution and scaled by MPP (:func:`scaled_distance`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from hpcpath.errors import ConfigError
from hpcpath.tissue import tile_tissue_fraction

__all__ = ["CAMELYON_CENTRE_FRACTION", "centre_boxes", "region_fraction", "centre_labels",
           "PatchSamples", "point_patches", "negative_indices", "negative_centres",
           "scaled_distance", "context_boxes", "balance", "split_groups", "split_by_group"]

CAMELYON_CENTRE_FRACTION = 50 / 80  # 50 px centre of an 80 px window, at the patch's scale
SPLITS = ("train", "val", "test")


def _boxes(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ConfigError(f"boxes must be (N, 4) x, y, w, h, got shape {b.shape}")
    return b


def _scale(mask_downsample) -> tuple[float, float]:
    sx, sy = np.broadcast_to(np.asarray(mask_downsample, dtype=np.float64), (2,))
    if sx <= 0 or sy <= 0:
        raise ConfigError(f"mask_downsample must be positive, got {mask_downsample}")
    return float(sx), float(sy)


def centre_boxes(boxes, centre_fraction: float) -> np.ndarray:
    """The central ``centre_fraction`` part of each box (same centre, sides scaled)."""
    if not 0 < centre_fraction <= 1:
        raise ConfigError(f"centre_fraction must be in (0, 1], got {centre_fraction}")
    b = _boxes(boxes).copy()
    shrink = (1 - centre_fraction) / 2
    b[:, 0] += b[:, 2] * shrink
    b[:, 1] += b[:, 3] * shrink
    b[:, 2:] *= centre_fraction
    return b


def region_fraction(mask: np.ndarray, mask_downsample, boxes, *,
                    origin: tuple[float, float] = (0.0, 0.0),
                    positive: Sequence[int] | None = None) -> np.ndarray:
    """``(N,)`` float32 fraction of each box's mask pixels that are annotated.

    Annotated means ``> 0``, or one of ``positive`` values for a multi-class raster.
    ``origin`` is the level-0 position of the mask's top-left corner.
    """
    mask = np.asarray(mask)
    hit = mask > 0 if positive is None else np.isin(mask, list(positive))
    b = _boxes(boxes).copy()
    b[:, 0] -= origin[0]
    b[:, 1] -= origin[1]
    return tile_tissue_fraction(hit, b, _scale(mask_downsample))


def centre_labels(mask: np.ndarray, mask_downsample, boxes, *, centre_fraction: float = 1.0,
                  origin: tuple[float, float] = (0.0, 0.0),
                  positive: Sequence[int] | None = None) -> np.ndarray:
    """``(N,)`` bool: any annotated pixel centre in the box's central square (module
    docstring; ``CAMELYON_CENTRE_FRACTION`` for the 50-in-80 rule)."""
    inner = centre_boxes(boxes, centre_fraction)
    return region_fraction(mask, mask_downsample, inner, origin=origin, positive=positive) > 0


class PatchSamples(NamedTuple):
    """Patches sampled around points: centres, quarter turns to apply, source point."""

    centres: np.ndarray       # (K, 2) float64 level-0 x, y
    quarter_turns: np.ndarray  # (K,) int8: rotate the patch by 90 degrees this many times
    point_index: np.ndarray   # (K,) int64 row of ``points`` each sample came from
    patch_px: float

    @property
    def boxes(self) -> np.ndarray:
        """``(K, 4)`` level-0 ``x, y, w, h`` of each patch."""
        tl = self.centres - self.patch_px / 2
        return np.c_[tl, np.full((len(tl), 2), float(self.patch_px))]


def point_patches(points, *, patch_px: float, jitter_px: float = 0.0, rotations: int = 0,
                  n_per_point: int = 1, seed: int = 0) -> PatchSamples:
    """Positive patches for point annotations (mitoses).

    Each point gives ``n_per_point`` centres drawn uniformly from the disc of radius
    ``jitter_px`` around it (the point itself when 0), so every centre lies within
    ``jitter_px`` of its point; ``rotations=4`` repeats each centre at 0, 90, 180, 270
    degrees (``quarter_turns``), the lossless augmentations of a square patch.
    """
    if rotations not in (0, 4):
        raise ConfigError(f"rotations must be 0 (none) or 4 (quarter turns), got {rotations}")
    if jitter_px < 0 or n_per_point < 1 or patch_px <= 0:
        raise ConfigError("need jitter_px >= 0, n_per_point >= 1 and patch_px > 0")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(len(pts)), n_per_point)
    r = jitter_px * np.sqrt(rng.random(len(idx)))
    t = rng.uniform(0, 2 * np.pi, len(idx))
    centres = pts[idx] + np.c_[r * np.cos(t), r * np.sin(t)]
    turns = np.zeros(len(idx), np.int8)
    if rotations == 4:
        centres, idx = np.repeat(centres, 4, axis=0), np.repeat(idx, 4)
        turns = np.tile(np.arange(4, dtype=np.int8), len(turns))
    return PatchSamples(centres, turns, idx.astype(np.int64), float(patch_px))


def scaled_distance(distance_px: float, mpp: float, ref_mpp: float = 0.25) -> float:
    """A distance given in pixels at ``ref_mpp`` (60 px at 0.25 um/px = 15 um) in pixels of
    a slide at ``mpp``."""
    if mpp <= 0 or ref_mpp <= 0:
        raise ConfigError(f"mpp must be positive, got mpp={mpp}, ref_mpp={ref_mpp}")
    return float(distance_px) * ref_mpp / mpp


def negative_indices(candidates, points, *, min_distance_px: float, n: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """Sorted indices of up to ``n`` candidates (all when None) at least ``min_distance_px``
    from every point, drawn at random (deterministic for ``seed``)."""
    from scipy.spatial import cKDTree

    cand = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts):
        dist, _ = cKDTree(pts).query(cand, k=1)
        ok = np.flatnonzero(dist >= min_distance_px)
    else:
        ok = np.arange(len(cand))
    if n is not None and n < len(ok):
        ok = np.sort(np.random.default_rng(seed).choice(ok, size=n, replace=False))
    return ok


def negative_centres(candidates, points, *, min_distance_px: float, n: int | None = None,
                     seed: int = 0) -> np.ndarray:
    """The candidates chosen by :func:`negative_indices`, as ``(n, 2)`` centres."""
    cand = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    return cand[negative_indices(cand, points, min_distance_px=min_distance_px, n=n, seed=seed)]


def context_boxes(centres, patch_px: float, downsample_ratio: float) -> np.ndarray:
    """Level-0 boxes of a context patch centred on the same points, ``downsample_ratio``
    times wider; read at ``downsample_ratio`` times the primary patch's downsample it has
    the same pixel size (multi-scale CAMELYON models)."""
    if downsample_ratio <= 0 or patch_px <= 0:
        raise ConfigError("patch_px and downsample_ratio must be positive")
    c = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    side = float(patch_px) * downsample_ratio
    return np.c_[c - side / 2, np.full((len(c), 2), side)]


def balance(labels, ratio_neg_per_pos: float, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping every positive (``labels > 0``) and a random
    ``ratio_neg_per_pos`` negatives per positive (all negatives if there are fewer).
    A set with no positives keeps no negatives: balance per slide only where it has some."""
    if ratio_neg_per_pos < 0:
        raise ConfigError(f"ratio_neg_per_pos must be >= 0, got {ratio_neg_per_pos}")
    lab = np.asarray(labels).reshape(-1)
    pos, neg = np.flatnonzero(lab > 0), np.flatnonzero(~(lab > 0))
    k = min(len(neg), int(round(ratio_neg_per_pos * len(pos))))
    keep = np.random.default_rng(seed).choice(neg, size=k, replace=False)
    return np.sort(np.concatenate([pos, keep])).astype(np.int64)


def _counts(n: int, fractions: Sequence[float] | np.ndarray) -> list[int]:
    """Split n into len(fractions) parts by largest remainder; train (first) gets at least
    one when n >= 1 so every stratum is seen in training."""
    exact = np.asarray(fractions, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n and counts[0] == 0 and fractions[0] > 0:
        donor = int(np.argmax(counts))
        counts[donor] -= 1
        counts[0] += 1
    return counts.tolist()


def split_groups(groups: Sequence[Hashable], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                 stratify: Mapping[Any, Hashable] | None = None, seed: int = 0
                 ) -> dict[Hashable, str]:
    """``{group: "train" | "val" | "test"}`` for distinct groups (slides or patients).

    Deterministic: groups are sorted, then shuffled by ``seed``.  With ``stratify``
    (``{group: label}``), each label is split on its own, so every label keeps its share and
    appears in train whenever it has a group.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if len(fr) != 3 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ConfigError("fractions must be three non-negative numbers summing to 1, "
                          f"got {fractions}")
    uniq = sorted(set(groups), key=lambda g: (type(g).__name__, g))
    strata: dict[Hashable, list[Hashable]]
    if stratify is None:
        strata = {None: uniq}
    else:
        missing = [g for g in uniq if g not in stratify]
        if missing:
            raise ConfigError(f"no stratify label for group {missing[0]!r}")
        strata = {}
        for g in uniq:
            strata.setdefault(stratify[g], []).append(g)
    rng = np.random.default_rng(seed)
    out: dict[Hashable, str] = {}
    for key in sorted(strata, key=lambda k: (type(k).__name__, str(k))):
        members = strata[key]
        order = rng.permutation(len(members))
        start = 0
        for name, count in zip(SPLITS, _counts(len(members), fr)):
            for i in order[start:start + count]:
                out[members[i]] = name
            start += count
    return out


def split_by_group(groups: Sequence[Hashable], fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   stratify=None, seed: int = 0) -> dict[str, np.ndarray]:
    """Item indices per split, every group (``groups[i]`` is item i's slide or patient) in
    exactly one split, so no patient leaks between train and test.

    ``stratify`` is ``{group: label}`` or a per-item sequence (constant within each group).
    """
    groups = list(groups)
    if stratify is not None and not isinstance(stratify, Mapping):
        per_item = list(stratify)
        if len(per_item) != len(groups):
            raise ConfigError("stratify must have one label per item or be {group: label}")
        mapping: dict = {}
        for g, lab in zip(groups, per_item):
            if mapping.setdefault(g, lab) != lab:
                raise ConfigError(f"group {g!r} has more than one stratify label "
                                  f"({mapping[g]!r}, {lab!r})")
        stratify = mapping
    assign = split_groups(groups, fractions, stratify, seed)
    names = np.array([assign[g] for g in groups], dtype=object)
    return {s: np.flatnonzero(names == s) for s in SPLITS}

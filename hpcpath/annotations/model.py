"""One geometry model for every annotation format: regions (polygons with holes) and points.

Every reader turns its file into an :class:`AnnotationSet` in level-0 pixel coordinates, so
clipping, validation and rasterisation exist once.  Rasterisation goes through
:func:`hpcpath.geometry.rasterize_polygons` (pixel-centre, even-odd rule): the same polygon
gives the same pixels here, in the synthetic slides' masks and in the tiling code.  Each
region and point remembers its ``source`` file and ``element`` so every error and warning
can name both.  Hand-drawn files are messy: :meth:`AnnotationSet.validate` turns each defect
(a crossing ring, a NaN vertex, an empty ring) into one warning and a repaired or skipped
region, never an error, so one bad nucleus never costs a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from hpcpath.annotations._errors import fail, warn
from hpcpath.errors import ConfigError
from hpcpath.geometry import rasterize_polygons

__all__ = ["Region", "Point", "AnnotationSet", "UNCLASSIFIED"]

UNCLASSIFIED = "Unclassified"  # label of objects with no class/group (QuPath's own term)


MAX_COORD = 2.0 ** 31  # |x|, |y| at or beyond this lie past any slide: a corrupt vertex


def _ring_array(ring, source: str, element: str) -> np.ndarray:
    """``(K, 2)`` float64 vertices without the closing vertex.  Only the shape is checked
    here (a reader skips the element when it fails); NaN, huge or repeated vertices are
    dealt with by :meth:`AnnotationSet.validate`, one warning per defect."""
    try:
        arr = np.array(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise fail(source, element, "vertices must be numbers") from None
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise fail(source, element,
                   f"a ring must be a list of x, y vertices, got shape {arr.shape}")
    if len(arr) > 1 and (arr[0] == arr[-1]).all():
        arr = arr[:-1]  # drop the closing vertex: one convention for every format
    arr.setflags(write=False)
    return arr


def _ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area (no shapely needed)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@dataclass(frozen=True, eq=False)
class Region:
    """A polygon: ``rings[0]`` is the outer boundary, the rest are holes; ``(K, 2)`` float64
    level-0 ``x, y`` vertices without the closing vertex.

    ``more`` holds the further polygons of a multipolygon (each a tuple of rings, outer
    first): a hand-drawn ring that crosses itself is repaired into several parts, and all of
    them stay one region, named by its element, so nothing drawn is lost or counted twice.
    """

    rings: tuple[np.ndarray, ...]
    label: str
    source: str
    element: str
    more: tuple[tuple[np.ndarray, ...], ...] = ()

    def __post_init__(self) -> None:
        rings = tuple(_ring_array(r, self.source, self.element) for r in self.rings)
        if not rings:
            raise fail(self.source, self.element, "polygon has no rings")
        more = tuple(tuple(_ring_array(r, self.source, self.element) for r in part)
                     for part in self.more)
        object.__setattr__(self, "rings", rings)
        object.__setattr__(self, "more", tuple(p for p in more if p))

    @property
    def parts(self) -> tuple[tuple[np.ndarray, ...], ...]:
        """Every polygon of the region (one unless it is a multipolygon)."""
        return (self.rings, *self.more)

    @property
    def outer(self) -> np.ndarray:
        return self.rings[0]

    @property
    def holes(self) -> tuple[np.ndarray, ...]:
        return self.rings[1:]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``xmin, ymin, xmax, ymax`` of the outer rings (all parts)."""
        outer = np.concatenate([p[0] for p in self.parts]).reshape(-1, 2)
        if not len(outer):
            return (np.nan,) * 4
        (x0, y0), (x1, y1) = outer.min(axis=0), outer.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area(self) -> float:
        """Outer areas minus hole areas, over all parts (level-0 px^2)."""
        return sum(abs(_ring_area(p[0])) - sum(abs(_ring_area(h)) for h in p[1:])
                   for p in self.parts)

    def replace(self, **changes) -> Region:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Point:
    """A point annotation (mitosis, cell centre) in level-0 pixels."""

    x: float
    y: float
    label: str
    source: str
    element: str


def _shapely():
    try:
        import shapely
    except ImportError as exc:  # pragma: no cover - shapely is in the annotations extra
        raise ImportError("clipping and validating annotations needs shapely: "
                          "pip install 'hpcpath[annotations]'") from exc
    return shapely


def _to_shapely(region: Region):
    shapely = _shapely()
    polys = [shapely.Polygon(p[0], list(p[1:])) for p in region.parts]
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


def _polygon_parts(geom) -> list:
    """Polygonal parts with positive area of any shapely geometry."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom] if geom.area > 0 else []
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def _from_shapely(polys, like: Region, element: str) -> Region:
    """A region of one or more shapely polygons (a list makes a multipolygon)."""
    def rings(poly):
        return (np.asarray(poly.exterior.coords)[:, :2],
                *[np.asarray(h.coords)[:, :2] for h in poly.interiors])

    polys = list(polys) if isinstance(polys, (list, tuple)) else [polys]
    return like.replace(rings=rings(polys[0]), more=tuple(rings(p) for p in polys[1:]),
                        element=element)


def _check_classes(items, classes: Collection[str]) -> None:
    """Raise for the first region or point whose label is not a known class."""
    known = set(classes)
    for item in items:
        if item.label not in known:
            raise fail(item.source, item.element,
                       f"unknown class {item.label!r} (known: "
                       f"{', '.join(map(repr, sorted(known))) or 'none'})")


def _collinear(ring: np.ndarray) -> bool:
    """All vertices on one line (zero area whatever the vertex order; a bow-tie's signed
    area is zero too, but it is not empty)."""
    d = ring - ring[0]
    k = int(np.argmax(np.abs(d).sum(axis=1)))
    cross = d[:, 0] * d[k, 1] - d[:, 1] * d[k, 0]
    return bool(np.all(np.abs(cross) <= 1e-12 * float((d[k] ** 2).sum())))


def _coordinate_defect(xy: np.ndarray) -> str | None:
    """Why these coordinates cannot be a place on a slide (NaN, inf, 1e30), or None."""
    bad = ~np.isfinite(xy)
    if bad.any():
        return f"non-finite vertex coordinate ({xy[bad].flat[0]})"
    big = np.abs(xy) >= MAX_COORD
    if big.any():
        return f"vertex coordinate {xy[big].flat[0]:g} lies beyond any slide"
    return None


def _ring_defect(ring: np.ndarray) -> str | None:
    """Why a (de-duplicated) ring encloses no area, or None."""
    reason = _coordinate_defect(ring)
    if reason:
        return reason
    distinct = len(np.unique(ring, axis=0))
    if distinct < 3:
        return f"{distinct} distinct vertices, need at least 3"
    if _collinear(ring):
        return "zero area"
    return None


def _dedupe(ring: np.ndarray) -> np.ndarray:
    """Drop vertices that repeat the one before (the shape is unchanged; hand-drawn files
    are full of them, so they cost no warning)."""
    if len(ring) < 2:
        return ring
    keep = np.r_[True, (np.diff(ring, axis=0) != 0).any(axis=1)]
    out = ring[keep]
    if len(out) > 1 and (out[0] == out[-1]).all():
        out = out[:-1]
    return out


def _clean(region: Region, sink: list[str]) -> Region | None:
    """The region made usable, or None (skipped), with one warning per defect.

    Skipped: an outline with NaN/inf or beyond-any-slide coordinates, fewer than 3 distinct
    vertices or zero area (a bad hole is dropped, its polygon kept).  A self-intersecting
    polygon is repaired (``make_valid``; ``buffer(0)`` when that keeps it one polygon of
    the same area); when the repair splits it (a bow-tie, a figure eight), every part is
    kept as one multipolygon region.
    """
    src, el = region.source, region.element
    multi = len(region.parts) > 1
    parts = []
    for i, part in enumerate(region.parts):
        what = f"part {i} " if multi else ""
        outer = _dedupe(part[0])
        reason = _ring_defect(outer)
        if reason:
            warn(sink, src, el, f"{what}outline: {reason}, skipped")
            continue
        holes = []
        for k, hole in enumerate(part[1:], 1):
            hole = _dedupe(hole)
            reason = _ring_defect(hole)
            if reason:
                warn(sink, src, el, f"{what}hole {k}: {reason}, hole dropped")
            else:
                holes.append(hole)
        parts.append((outer, *holes))
    if not parts:
        return None
    region = region.replace(rings=parts[0], more=tuple(parts[1:]))
    shapely = _shapely()
    poly = _to_shapely(region)
    if poly.is_valid:
        return region
    reason = shapely.is_valid_reason(poly)
    fixed = _polygon_parts(shapely.make_valid(poly))
    if len(fixed) > 1:
        target = sum(p.area for p in fixed)
        buffered = _polygon_parts(poly.buffer(0))
        if len(buffered) == 1 and abs(buffered[0].area - target) <= 1e-9 * max(target, 1.0):
            fixed = buffered
    if not fixed:
        warn(sink, src, el, f"invalid polygon ({reason}) with no area left, skipped")
        return None
    if len(fixed) == 1:
        warn(sink, src, el, f"invalid polygon ({reason}) repaired")
    else:
        warn(sink, src, el, f"invalid polygon ({reason}) splits into {len(fixed)} parts, "
             "all kept as one multipolygon")
    return _from_shapely(fixed, region, el)


def _clean_point(p: Point, sink: list[str]) -> bool:
    reason = _coordinate_defect(np.array([p.x, p.y], np.float64))
    if reason:
        warn(sink, p.source, p.element, f"point: {reason}, skipped")
    return reason is None


@dataclass
class AnnotationSet:
    """All regions and points read for one slide, plus the warnings met on the way.

    Methods return new sets (the readers' output is never modified in place); warnings carry
    over and accumulate.
    """

    regions: list[Region] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.regions) + len(self.points)

    @classmethod
    def concat(cls, sets: Iterable[AnnotationSet]) -> AnnotationSet:
        """One set from several files' sets (a slide with an XML and a point table)."""
        out = cls()
        for s in sets:
            out.regions += s.regions
            out.points += s.points
            out.warnings += s.warnings
        return out

    def labels(self) -> list[str]:
        """Sorted distinct labels of regions and points."""
        return sorted({r.label for r in self.regions} | {p.label for p in self.points})

    def filter(self, labels: Collection[str] | str) -> AnnotationSet:
        """Only the regions and points whose label is in ``labels``."""
        keep = {labels} if isinstance(labels, str) else set(labels)
        return AnnotationSet([r for r in self.regions if r.label in keep],
                             [p for p in self.points if p.label in keep], list(self.warnings))

    def relabel(self, label_map: Mapping[str, str]) -> AnnotationSet:
        """Rename labels (e.g. CAMELYON16 groups ``_0``, ``_1`` -> ``Tumor``); others keep
        theirs."""
        return AnnotationSet(
            [r.replace(label=label_map.get(r.label, r.label)) for r in self.regions],
            [dataclasses.replace(p, label=label_map.get(p.label, p.label)) for p in self.points],
            list(self.warnings))

    def points_xy(self) -> np.ndarray:
        """``(M, 2)`` float64 ``x, y`` of the points."""
        return np.array([(p.x, p.y) for p in self.points], dtype=np.float64).reshape(-1, 2)

    def clip(self, width: float, height: float) -> AnnotationSet:
        """Clip regions to the slide ``[0, width] x [0, height]``; drop what falls outside.

        A region wholly inside keeps its exact vertices (so its pixels do not move); each
        clipped or dropped region or point adds a one-line warning.
        """
        shapely = None
        sink = list(self.warnings)
        regions: list[Region] = []
        for r in self.regions:
            x0, y0, x1, y1 = r.bounds
            if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
                regions.append(r)
                continue
            shapely = shapely or _shapely()
            clean = _clean(r, sink)
            if clean is None:
                continue
            parts = _polygon_parts(_to_shapely(clean).intersection(shapely.box(0, 0, width, height)))
            if not parts:
                warn(sink, clean.source, clean.element, "outside slide bounds, dropped")
                continue
            warn(sink, clean.source, clean.element, "clipped to slide bounds")
            regions.append(_from_shapely(parts, clean, clean.element))
        points = []
        for p in self.points:
            if 0 <= p.x < width and 0 <= p.y < height:
                points.append(p)
            else:
                warn(sink, p.source, p.element, "point outside slide bounds, dropped")
        return AnnotationSet(regions, points, sink)

    def validate(self, classes: Mapping[str, int] | Collection[str] | None = None
                 ) -> AnnotationSet:
        """Every region and point made usable, one warning per defect (:func:`_clean`):
        repeated vertices dropped; self-intersecting polygons repaired, a polygon that
        repair splits kept whole as a multipolygon; regions and points with NaN/inf or
        beyond-any-slide coordinates, fewer than 3 distinct vertices or zero area skipped.
        Only an unknown label (with ``classes``) is an error: that is the task's config.
        """
        if classes is not None:
            _check_classes([*self.regions, *self.points], classes)
        sink = list(self.warnings)
        regions = [c for c in (_clean(r, sink) for r in self.regions) if c is not None]
        points = [p for p in self.points if _clean_point(p, sink)]
        return AnnotationSet(regions, points, sink)

    def rasterize(self, shape: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0),
                  downsample: float = 1.0, classes: Mapping[str, int] | None = None
                  ) -> np.ndarray:
        """``uint8`` label raster: pixel ``(r, c)`` covers level-0
        ``origin + (c, r) * downsample`` and takes the value of the region containing its
        centre (:mod:`hpcpath.geometry` rule; holes stay empty).

        ``classes`` maps label -> value (default: every region is 1; a label missing from it
        is an error).  Overlaps: later regions win, except that value-0 regions (exclusions,
        e.g. CAMELYON16's ``_2`` group) are drawn last so they always carve out.
        """
        if classes is not None:
            _check_classes(self.regions, classes)
            bad = {k: v for k, v in classes.items() if not 0 <= int(v) <= 255}
            if bad:
                raise ConfigError(f"class values must be 0..255 for a uint8 raster, got {bad}")
        values = [1 if classes is None else int(classes[r.label]) for r in self.regions]
        order = sorted(range(len(values)), key=lambda i: values[i] == 0)  # stable
        polygons, per_polygon = [], []
        for i in order:  # a multipolygon's parts share the region's value
            for part in self.regions[i].parts:
                polygons.append(list(part))
                per_polygon.append(values[i])
        return rasterize_polygons(polygons, shape, origin=origin, downsample=downsample,
                                  values=per_polygon)

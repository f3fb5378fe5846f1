"""One geometry model for every annotation format: regions (polygons with holes) and points.

Every reader turns its file into an :class:`AnnotationSet` in level-0 pixel coordinates, so
clipping, validation and rasterisation exist once.  Rasterisation goes through
:func:`hpcpath.geometry.rasterize_polygons` (pixel-centre, even-odd rule): the same polygon
gives the same pixels here, in the synthetic slides' masks and in the tiling code.  Each
region and point remembers its ``source`` file and ``element`` so every error and warning
can name both.
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


def _ring_array(ring, source: str, element: str) -> np.ndarray:
    try:
        arr = np.array(ring, dtype=np.float64)
    except (TypeError, ValueError):
        raise fail(source, element, "vertices must be numbers") from None
    if arr.size == 0:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise fail(source, element,
                   f"a ring must be a list of x, y vertices, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise fail(source, element, "non-finite vertex coordinate")
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
    level-0 ``x, y`` vertices without the closing vertex."""

    rings: tuple[np.ndarray, ...]
    label: str
    source: str
    element: str

    def __post_init__(self) -> None:
        rings = tuple(_ring_array(r, self.source, self.element) for r in self.rings)
        if not rings:
            raise fail(self.source, self.element, "polygon has no rings")
        object.__setattr__(self, "rings", rings)

    @property
    def outer(self) -> np.ndarray:
        return self.rings[0]

    @property
    def holes(self) -> tuple[np.ndarray, ...]:
        return self.rings[1:]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``xmin, ymin, xmax, ymax`` of the outer ring."""
        (x0, y0), (x1, y1) = self.outer.min(axis=0), self.outer.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area(self) -> float:
        """Outer area minus hole areas (level-0 px^2)."""
        return abs(_ring_area(self.outer)) - sum(abs(_ring_area(h)) for h in self.holes)

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
    return shapely.Polygon(region.outer, list(region.holes))


def _polygon_parts(geom) -> list:
    """Polygonal parts with positive area of any shapely geometry."""
    if geom.is_empty:
        return []
    if geom.geom_type == "Polygon":
        return [geom] if geom.area > 0 else []
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def _from_shapely(poly, like: Region, element: str) -> Region:
    rings = [np.asarray(poly.exterior.coords)[:, :2]]
    rings += [np.asarray(h.coords)[:, :2] for h in poly.interiors]
    return like.replace(rings=tuple(rings), element=element)


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


def _check_not_empty(region: Region) -> None:
    for k, ring in enumerate(region.rings):
        what = "polygon" if k == 0 else f"hole {k}"
        distinct = len(np.unique(ring, axis=0))
        if distinct < 3:
            raise fail(region.source, region.element,
                       f"empty {what}: {distinct} distinct vertices, need at least 3")
        if _collinear(ring):
            raise fail(region.source, region.element, f"empty {what}: zero area")


def _repair(region: Region, sink: list[str]) -> Region:
    """Empty rings are errors.  A self-intersecting polygon is repaired only when the fix is
    one polygon that keeps all of its area; a bow-tie (two lobes) is an error, since any
    single-polygon answer would silently drop a lobe."""
    _check_not_empty(region)
    shapely = _shapely()
    poly = _to_shapely(region)
    if poly.is_valid:
        return region
    reason = shapely.is_valid_reason(poly)
    fixed = _polygon_parts(shapely.make_valid(poly))
    if len(fixed) != 1:
        target = sum(p.area for p in fixed)
        buffered = _polygon_parts(poly.buffer(0))
        if len(buffered) == 1 and abs(buffered[0].area - target) <= 1e-9 * max(target, 1.0):
            fixed = buffered
        else:
            raise fail(region.source, region.element,
                       f"invalid polygon ({reason}): it splits into {len(fixed)} parts; "
                       "redraw it or save the parts as separate annotations")
    warn(sink, region.source, region.element, f"invalid polygon ({reason}) repaired")
    return _from_shapely(fixed[0], region, region.element)


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
            r = _repair(r, sink)
            parts = _polygon_parts(_to_shapely(r).intersection(shapely.box(0, 0, width, height)))
            if not parts:
                warn(sink, r.source, r.element, "outside slide bounds, dropped")
                continue
            warn(sink, r.source, r.element, "clipped to slide bounds")
            for i, part in enumerate(parts):
                element = r.element if len(parts) == 1 else f"{r.element} part {i}"
                regions.append(_from_shapely(part, r, element))
        points = []
        for p in self.points:
            if 0 <= p.x < width and 0 <= p.y < height:
                points.append(p)
            else:
                warn(sink, p.source, p.element, "point outside slide bounds, dropped")
        return AnnotationSet(regions, points, sink)

    def validate(self, classes: Mapping[str, int] | Collection[str] | None = None
                 ) -> AnnotationSet:
        """Check every region and label; return the set with repairable polygons repaired.

        Errors (``AnnotationError`` naming file and element): a ring with fewer than 3
        distinct vertices or zero area; a self-intersecting polygon that does not repair into
        one polygon of the same area (a bow-tie); with ``classes``, a label not in it.
        Repairs (``make_valid``, else ``buffer(0)``) add a warning.
        """
        if classes is not None:
            _check_classes([*self.regions, *self.points], classes)
        sink = list(self.warnings)
        regions = []
        for r in self.regions:
            regions.append(_repair(r, sink))
        return AnnotationSet(regions, list(self.points), sink)

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
        return rasterize_polygons([list(self.regions[i].rings) for i in order], shape,
                                  origin=origin, downsample=downsample,
                                  values=[values[i] for i in order])

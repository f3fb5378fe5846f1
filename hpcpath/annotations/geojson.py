"""GeoJSON as QuPath exports it: a ``FeatureCollection``, a bare list of features, or one
``Feature`` (a bare geometry is accepted too).

Areas: ``Polygon`` (outer ring, then holes) and ``MultiPolygon`` (one region per polygon).
Points: ``Point``, ``MultiPoint``.  ``LineString``/``MultiLineString`` enclose no area, so
they are skipped with a warning.  The class is ``properties.classification.name`` (QuPath);
unclassified objects get :data:`UNCLASSIFIED`.  For QuPath cells, ``geometry`` is the cell
boundary (``nucleusGeometry`` is ignored).  Coordinates are level-0 pixels; a third (z)
coordinate is dropped.  A feature (or one polygon of a ``MultiPolygon``) that cannot be
read is skipped with a warning: an unknown geometry type, coordinates that are not
``[x, y]`` numbers, a ring that does not end on its first vertex (GeoJSON rings are closed:
an open one may be a truncated outline).  The shape's own defects are left to
:meth:`AnnotationSet.validate`.  Only a document that is not GeoJSON at all fails.

Writing: every GeoJSON hpcpath writes (detections, the synthetic slides' truth) is made by
:func:`qupath_feature` and :func:`feature_collection_bytes`, so it is RFC 7946 and what
QuPath's File > Import objects reads: a UUID ``id`` per feature, ``properties.objectType``,
``properties.classification`` {name, color [r, g, b]}, ``properties.measurements`` (name ->
number), level-0 pixel coordinates, closed rings (tests/schemas/ holds the schemas).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from hpcpath.annotations._errors import AnnotationError, fail, skip, warn
from hpcpath.annotations.model import UNCLASSIFIED, AnnotationSet, Point, Region

__all__ = [
    "OBJECT_TYPES",
    "feature_collection_bytes",
    "point_geometry",
    "polygon_geometry",
    "qupath_feature",
    "read_geojson",
]

OBJECT_TYPES = ("annotation", "detection")
_ID_NAMESPACE = uuid.UUID("8f0c2a4e-6b1d-4d59-9a57-3c1f5e0b7a21")

_GEOMETRIES = {"Point", "MultiPoint", "LineString", "MultiLineString", "Polygon",
               "MultiPolygon", "GeometryCollection"}


def _features(doc, src: str) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            feats = doc.get("features")
            if not isinstance(feats, list):
                raise fail(src, "FeatureCollection", '"features" must be a list')
            return feats
        if kind == "Feature":
            return [doc]
        if isinstance(kind, str) and kind in _GEOMETRIES:  # "type" may be any JSON value
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise fail(src, "top level", "not a GeoJSON FeatureCollection, Feature or list of features")


def _label(props) -> str:
    c = props.get("classification") if isinstance(props, dict) else None
    if isinstance(c, dict):
        c = c.get("name") or (": ".join(c["names"]) if isinstance(c.get("names"), list) else None)
    return c if isinstance(c, str) and c.strip() else UNCLASSIFIED


def _positions(ring, src: str, element: str) -> np.ndarray:
    try:
        return np.array([[float(p[0]), float(p[1])] for p in ring], dtype=np.float64
                        ).reshape(-1, 2)
    except (TypeError, ValueError, IndexError, KeyError):
        raise fail(src, element, "coordinates must be lists of [x, y] numbers") from None


def _position(p, src: str, element: str) -> tuple[float, float]:
    (x, y), = _positions([p], src, element)
    return float(x), float(y)


def _polygon(coords, label: str, src: str, element: str) -> Region:
    if not isinstance(coords, list) or not all(isinstance(r, list) for r in coords):
        raise fail(src, element, "Polygon coordinates must be a list of rings")
    if not coords:
        raise fail(src, element, "empty polygon: no rings")
    rings = [_positions(r, src, element) for r in coords]
    for k, ring in enumerate(rings):
        ends = ring[[0, -1]] if len(ring) else ring
        if len(ring) and np.isfinite(ends).all() and (ends[0] != ends[1]).any():
            what = "outline" if k == 0 else f"hole {k}"
            raise fail(src, element, f"{what} is not closed (its last vertex "
                       f"{ends[1].tolist()} is not its first {ends[0].tolist()})")
    return Region(tuple(rings), label, src, element)


def _geometry(geom, label: str, src: str, element: str, out: AnnotationSet) -> None:
    if not isinstance(geom, dict):
        raise fail(src, element, "geometry must be a JSON object")
    kind = geom.get("type")
    if kind == "GeometryCollection":
        for k, g in enumerate(geom.get("geometries") or []):
            _guarded(g, label, src, f"{element} geometry {k}", out)
        return
    if not isinstance(kind, str) or kind not in _GEOMETRIES:
        raise fail(src, element, f"unknown geometry type {kind!r}")
    coords = geom.get("coordinates")
    if coords is None:
        raise fail(src, element, f"{kind} has no coordinates")
    if kind == "Polygon":
        out.regions.append(_polygon(coords, label, src, element))
    elif kind == "MultiPolygon":
        if not isinstance(coords, list):
            raise fail(src, element, "MultiPolygon coordinates must be a list of polygons")
        for k, poly in enumerate(coords):  # each polygon on its own: a bad one costs itself
            try:
                out.regions.append(_polygon(poly, label, src, f"{element} polygon {k}"))
            except AnnotationError as exc:
                skip(out.warnings, exc)
    elif kind == "Point":
        out.points.append(Point(*_position(coords, src, element), label, src, element))
    elif kind == "MultiPoint":
        for k, (x, y) in enumerate(_positions(coords, src, element)):
            out.points.append(Point(float(x), float(y), label, src, f"{element} point {k}"))
    else:
        warn(out.warnings, src, element, f"{kind} is not an area, skipped")


def _guarded(geom, label: str, src: str, element: str, out: AnnotationSet) -> None:
    """One geometry read, or skipped with a warning when it cannot be."""
    try:
        _geometry(geom, label, src, element, out)
    except AnnotationError as exc:
        skip(out.warnings, exc)


def read_geojson(doc, path) -> AnnotationSet:
    """Regions and points of a decoded GeoJSON document."""
    src = os.fspath(path)
    out = AnnotationSet()
    for i, feat in enumerate(_features(doc, src)):
        element = f"feature {i}"
        if not isinstance(feat, dict):
            warn(out.warnings, src, element, "a feature must be a JSON object, skipped")
            continue
        geom = feat.get("geometry")
        if geom is None:
            warn(out.warnings, src, element, "no geometry, skipped")
            continue
        _guarded(geom, _label(feat.get("properties")), src, element, out)
    return out


# ----------------------------------------------------------------------------- writing
def point_geometry(x: float, y: float, ndigits: int | None = None) -> dict:
    """A GeoJSON ``Point`` at level-0 pixel ``(x, y)``."""
    xy = [float(x), float(y)]
    return {"type": "Point", "coordinates": [round(v, ndigits) for v in xy] if ndigits is not None else xy}


def polygon_geometry(rings: Sequence[np.ndarray]) -> dict:
    """A GeoJSON ``Polygon`` from (n, 2) level-0 rings (outline, then holes), each closed
    (its first vertex repeated at the end) as RFC 7946 requires."""
    out = []
    for ring in rings:
        r = np.asarray(ring, np.float64).reshape(-1, 2)
        if len(r) and (r[0] != r[-1]).any():
            r = np.vstack([r, r[:1]])
        out.append([[float(x), float(y)] for x, y in r])
    return {"type": "Polygon", "coordinates": out}


def qupath_feature(geometry: dict, name: str, color: Sequence[int], *, key: str,
                   object_type: str = "annotation",
                   measurements: Mapping[str, float] | None = None) -> dict:
    """One feature as QuPath imports it.  ``key`` names the object uniquely within its
    writer (e.g. ``slide/class/index``): the ``id`` is the UUID derived from it, so
    identical inputs give byte-identical files."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"objectType must be one of {OBJECT_TYPES}, not {object_type!r}")
    props: dict = {"objectType": object_type,
                   "classification": {"name": str(name), "color": [int(c) for c in color]},
                   "isLocked": False}
    if measurements:
        props["measurements"] = {str(k): float(v) for k, v in measurements.items()}
    return {"type": "Feature", "id": str(uuid.uuid5(_ID_NAMESPACE, key)), "geometry": geometry,
            "properties": props}


def feature_collection_bytes(features: Sequence[dict]) -> bytes:
    """The FeatureCollection as compact UTF-8 JSON with a final newline.  NaN or infinite
    numbers are refused (they are not JSON)."""
    doc = {"type": "FeatureCollection", "features": list(features)}
    return (json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n").encode()

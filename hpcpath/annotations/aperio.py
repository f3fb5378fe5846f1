"""Aperio ImageScope XML: ``Annotations/Annotation/Regions/Region/Vertices/Vertex``.

An ``Annotation`` is a layer; its class is, in this order: the layer's ``Name``; else the
``Name`` of its first ``Attribute`` whose ``Value`` is empty (MoNuSeg and other exports put
the class there: ``<Attribute Name="Epithelial" Value=""/>``); else the first non-empty
attribute ``Value``; else the ``Description`` attribute's value; else unclassified.  The
``Description`` attribute is ImageScope's default column, so its name is never a class.
Region ``Type``: 0 free-hand/polygon and 1 rectangle are areas; 2 is an
ellipse given by two bounding-box corners (read as a 64-gon); 3 arrow and 4 ruler are lines
(skipped with a warning); any other type is read by its vertex count (one vertex: a point,
three or more: a polygon).  A region that cannot be read (a vertex that is not a number) is
skipped with a warning; defects of the shape itself are left to
:meth:`AnnotationSet.validate`.  ``NegativeROA="1"`` regions are cut out of the same layer's
regions, as ImageScope's analyses do.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

from hpcpath.annotations._errors import AnnotationError, skip, warn
from hpcpath.annotations.asap import number
from hpcpath.annotations.model import (
    UNCLASSIFIED,
    AnnotationSet,
    Point,
    Region,
    _clean,
    _from_shapely,
    _polygon_parts,
    _shapely,
    _to_shapely,
)

__all__ = ["read_aperio"]

_NAMED = {"polygon": "0", "freehand": "0", "rectangle": "1", "ellipse": "2", "arrow": "3",
          "ruler": "4", "line": "4", "point": "5", "pin": "5"}


def _label(ann: ET.Element) -> str:
    """The layer's class (module docstring gives the order)."""
    name = (ann.get("Name") or "").strip()
    if name:
        return name
    attrs = [((a.get("Name") or "").strip(), (a.get("Value") or "").strip())
             for a in ann.iterfind("Attributes/Attribute")]
    others = [(n, v) for n, v in attrs if n.lower() != "description"]
    for n, v in others:
        if n and not v:
            return n
    for _n, v in others:
        if v:
            return v
    for n, v in attrs:
        if n.lower() == "description" and v:
            return v
    return (ann.get("Description") or "").strip() or UNCLASSIFIED


def _ellipse(xy: list[tuple[float, float]], n: int = 64) -> np.ndarray:
    a = np.asarray(xy)
    (x0, y0), (x1, y1) = a.min(axis=0), a.max(axis=0)
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    (cx, cy), (rx, ry) = ((x0 + x1) / 2, (y0 + y1) / 2), ((x1 - x0) / 2, (y1 - y0) / 2)
    return np.c_[cx + rx * np.cos(t), cy + ry * np.sin(t)]


def _cut(positive: list[Region], negative: list[Region], sink: list[str]) -> list[Region]:
    """Subtract the layer's negative regions from its positive ones."""
    if not negative:
        return positive
    shapely = _shapely()
    negative = [c for c in (_clean(r, sink) for r in negative) if c is not None]
    positive = [c for c in (_clean(r, sink) for r in positive) if c is not None]
    holes = [_to_shapely(r) for r in negative]
    cut = shapely.union_all(holes) if holes else None
    for r, h in zip(negative, holes):
        if not any(h.intersects(_to_shapely(p)) for p in positive):
            warn(sink, r.source, r.element, "negative region overlaps no region, skipped")
    out = []
    for r in positive:
        poly = _to_shapely(r)
        if cut is None or not poly.intersects(cut):
            out.append(r)
            continue
        parts = _polygon_parts(poly.difference(cut))
        if not parts:
            warn(sink, r.source, r.element, "wholly cut out by negative regions, dropped")
            continue
        out.append(_from_shapely(parts, r, r.element))
    return out


def read_aperio(root: ET.Element, path) -> AnnotationSet:
    """Regions and points of a parsed ImageScope document (``root`` is ``<Annotations>``)."""
    src = os.fspath(path)
    out = AnnotationSet()
    for i, ann in enumerate(root.findall("Annotation")):
        label = _label(ann)
        layer = f"Annotation {ann.get('Id', i + 1)}"
        positive: list[Region] = []
        negative: list[Region] = []
        for j, reg in enumerate(ann.iterfind("Regions/Region")):
            element = f"{layer} Region {reg.get('Id', j + 1)}"
            try:
                xy: Any = [(number(v.get("X"), src, f"{element} Vertex {k}", "X"),
                       number(v.get("Y"), src, f"{element} Vertex {k}", "Y"))
                      for k, v in enumerate(reg.iterfind("Vertices/Vertex"))]
            except AnnotationError as exc:
                skip(out.warnings, exc)
                continue
            kind = (reg.get("Type") or "0").strip()
            kind = _NAMED.get(kind.lower(), kind)
            if kind in ("3", "4"):
                warn(out.warnings, src, element, "a line (arrow or ruler) is not an area, skipped")
                continue
            if kind == "2" and len(xy) >= 2:
                xy = _ellipse(xy)
            elif kind not in ("0", "1", "2"):
                if len(xy) == 1:
                    out.points.append(Point(xy[0][0], xy[0][1], label, src, element))
                    continue
                if len(xy) < 3:
                    warn(out.warnings, src, element,
                         f"Type={kind} with {len(xy)} vertices is not an area, skipped")
                    continue
            region = Region((np.asarray(xy, np.float64).reshape(-1, 2),), label, src, element)
            (negative if reg.get("NegativeROA", "0") == "1" else positive).append(region)
        out.regions += _cut(positive, negative, out.warnings)
    return out

"""ASAP XML (the CAMELYON16 format): ``ASAP_Annotations/Annotations/Annotation``.

Each ``Annotation`` has a ``Type`` (``Polygon``, ``Spline``, ``Rectangle``, ``Dot``,
``PointSet``, ``Measurement``), a ``PartOfGroup`` (its class: CAMELYON16 uses ``_0``, ``_1``
for tumour and ``_2`` for exclusions; ``None`` means no group) and ``Coordinates`` in
level-0 pixels.  A ``Spline`` is read as the polygon through its control points (what
CAMELYON16's own mask tool rasterised); a ``Measurement`` is a line, so it is skipped with a
warning.  An annotation that cannot be read (a coordinate that is not a number) is skipped
with a warning; the shape's own defects are left to :meth:`AnnotationSet.validate`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from hpcpath.annotations._errors import AnnotationError, fail, skip, warn
from hpcpath.annotations.model import UNCLASSIFIED, AnnotationSet, Point, Region

__all__ = ["read_asap"]

_AREAS = {"polygon", "spline", "rectangle"}
_POINTS = {"dot", "pointset"}


def number(text: str | None, path, element: str, what: str) -> float:
    """A coordinate attribute as float; a comma decimal separator (seen in files written
    under some locales) is accepted."""
    if text is None:
        raise fail(path, element, f"{what} is missing")
    try:
        return float(text)
    except ValueError:
        pass
    try:
        if text.count(",") == 1 and "." not in text:
            return float(text.replace(",", "."))
    except ValueError:
        pass
    raise fail(path, element, f'{what}="{text}" is not a number')


def _coordinates(ann: ET.Element, path, element: str) -> list[tuple[float, float]]:
    node = ann.find("Coordinates")
    coords = [] if node is None else node.findall("Coordinate")
    out = []
    for k, c in enumerate(coords):
        where = f"{element} Coordinate {c.get('Order', k)}"
        order = c.get("Order")
        key = k if order is None else number(order, path, where, "Order")
        out.append((key, number(c.get("X"), path, where, "X"),
                    number(c.get("Y"), path, where, "Y")))
    out.sort(key=lambda t: t[0])  # ASAP draws in Order; files are usually in order already
    return [(x, y) for _, x, y in out]


def read_asap(root: ET.Element, path) -> AnnotationSet:
    """Regions and points of a parsed ASAP document (``root`` is ``<ASAP_Annotations>``)."""
    src = os.fspath(path)
    out = AnnotationSet()
    anns = root.find("Annotations")
    if anns is None:
        raise fail(src, "ASAP_Annotations", "no <Annotations> element")
    for i, ann in enumerate(anns.findall("Annotation")):
        name = ann.get("Name")
        element = f'Annotation "{name}"' if name else f"Annotation {i}"
        group = ann.get("PartOfGroup") or "None"
        label = UNCLASSIFIED if group == "None" else group
        kind = (ann.get("Type") or "Polygon").strip()
        try:
            xy = _coordinates(ann, src, element)
        except AnnotationError as exc:
            skip(out.warnings, exc)
            continue
        if kind.lower() in _AREAS:
            out.regions.append(Region((np.asarray(xy, np.float64).reshape(-1, 2),), label, src, element))
        elif kind.lower() in _POINTS:
            for k, (x, y) in enumerate(xy):
                where = element if kind.lower() == "dot" else f"{element} point {k}"
                out.points.append(Point(x, y, label, src, where))
        else:
            warn(out.warnings, src, element, f"Type={kind!r} is not an area or a point, skipped")
    return out

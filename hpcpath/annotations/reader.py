"""``read_annotations``: one entry point that picks the reader from the file itself.

``.xml`` is ASAP or Aperio ImageScope (told apart by the root element), ``.json`` /
``.geojson`` is GeoJSON, ``.csv`` a point table; any other name is sniffed (``<`` XML,
``{``/``[`` JSON).  Malformed files fail with one line carrying the parser's position.
Mask images are not read here: open them with :class:`MaskAnnotation`.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from hpcpath.annotations._errors import fail
from hpcpath.annotations.aperio import read_aperio
from hpcpath.annotations.asap import read_asap
from hpcpath.annotations.geojson import read_geojson
from hpcpath.annotations.model import AnnotationSet
from hpcpath.annotations.tables import read_point_table

__all__ = ["read_annotations"]

_MASKS = {".tif", ".tiff", ".png"}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise fail(path, None, f"cannot read ({exc.strerror or exc})") from None


def _xml(path: Path, data: bytes) -> AnnotationSet:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        line, col = exc.position
        reason = re.sub(r":\s*line \d+, column \d+\s*$", "", str(exc))
        raise fail(path, f"line {line} column {col}", f"malformed XML ({reason})") from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag == "ASAP_Annotations":
        return read_asap(root, path)
    if tag == "Annotations":
        return read_aperio(root, path)
    raise fail(path, f"<{tag}>", "root element is neither <ASAP_Annotations> (ASAP) nor "
               "<Annotations> (Aperio ImageScope)")


def _json(path: Path, data: bytes) -> AnnotationSet:
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise fail(path, f"byte {exc.start}", "not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise fail(path, f"line {exc.lineno} column {exc.colno}",
                   f"malformed JSON ({exc.msg})") from None
    return read_geojson(doc, path)


def read_annotations(path: str | os.PathLike, *, label_map: Mapping[str, str] | None = None,
                     validate: bool = True,
                     slide_dimensions: tuple[int, int] | None = None) -> AnnotationSet:
    """Read one annotation file into an :class:`AnnotationSet` (level-0 pixels).

    ``label_map`` renames labels (e.g. ``{"_0": "Tumor", "_1": "Tumor", "_2": "Exclusion"}``
    for CAMELYON16).  With ``validate`` (default) every region is made usable, one warning
    per defect: self-intersections repaired (a ring that splits kept as a multipolygon),
    empty, NaN or corrupt regions skipped (see :meth:`AnnotationSet.validate`); class names
    are checked later, against the class map of the task.  Only a file that cannot be
    parsed at all raises.  With ``slide_dimensions``
    (level-0 ``width, height``) regions are clipped to the slide, with a warning each.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in _MASKS:
        raise fail(p, None, "a mask image: open it with MaskAnnotation(path)")
    if suffix == ".csv":
        out = read_point_table(p)
    else:
        data = _read_bytes(p)
        head = data.lstrip()[:1]
        if suffix == ".xml" or (suffix not in (".json", ".geojson") and head == b"<"):
            out = _xml(p, data)
        elif suffix in (".json", ".geojson") or head in (b"{", b"["):
            out = _json(p, data)
        else:
            raise fail(p, None, "unknown annotation format (expected .xml, .json, .geojson "
                       "or .csv)")
    if label_map:
        out = out.relabel(label_map)
    if validate:
        out = out.validate()
    return out.clip(*slide_dimensions) if slide_dimensions is not None else out

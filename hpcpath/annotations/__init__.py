"""Annotations: every supported format read into one geometry model, one rasteriser.

Formats: ASAP XML and Aperio ImageScope XML (polygons, points, groups/classes), QuPath
GeoJSON, point tables (TUPAC16 mitoses), slide-level label tables, ChestX-ray14 multi-label
CSVs, and CAMELYON16-style mask TIFFs (:class:`MaskAnnotation`).  Coordinates are level-0
pixels; errors (a file that cannot be parsed) and warnings (a region or row skipped or
repaired, one per defect) are one line ``FILE: element: reason``.
"""

from hpcpath.annotations._errors import AnnotationError, AnnotationWarning
from hpcpath.annotations.mask import MaskAnnotation
from hpcpath.annotations.matching import match_annotations
from hpcpath.annotations.model import UNCLASSIFIED, AnnotationSet, Point, Region
from hpcpath.annotations.reader import read_annotations
from hpcpath.annotations.tables import (
                                        DEFAULT_CXR14,
                                        ChestXray,
                                        points_by_slide,
                                        read_chestxray_csv,
                                        read_label_table,
                                        read_point_table,
)

__all__ = [
    "AnnotationError",
    "AnnotationWarning",
    "AnnotationSet",
    "Region",
    "Point",
    "UNCLASSIFIED",
    "read_annotations",
    "MaskAnnotation",
    "match_annotations",
    "read_point_table",
    "points_by_slide",
    "read_label_table",
    "read_chestxray_csv",
    "ChestXray",
    "DEFAULT_CXR14",
]

"""CSV label sources: point tables (TUPAC16 mitoses), slide-level label tables (TUPAC16
proliferation scores) and the ChestX-ray14 image list with multi-label findings.

Row numbers in errors are file line numbers (the header is row 1), as a spreadsheet shows
them.  Column names match case-insensitively, surrounding spaces ignored.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from hpcpath.annotations._errors import AnnotationError, fail, skip
from hpcpath.annotations.model import UNCLASSIFIED, AnnotationSet, Point, _clean_point
from hpcpath.io.discover import SLIDE_SUFFIXES

__all__ = ["read_point_table", "points_by_slide", "read_label_table", "read_chestxray_csv",
           "ChestXray", "DEFAULT_CXR14"]

DEFAULT_CXR14 = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                 "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema",
                 "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"

_IMAGE_SUFFIXES = SLIDE_SUFFIXES | {".png", ".jpg", ".jpeg", ".bmp"}
_X = ("x", "centroid_x", "x_px", "col", "column")
_Y = ("y", "centroid_y", "y_px", "row")
_GROUP = ("slide_id", "slide", "image_id", "image", "image_name", "filename", "file", "case")
_POINT_LABEL = ("label", "class", "classification")
_ID = ("slide_id", "slide", "image_id", "image", "case_id", "case", "patient_id", "patient",
       "id", "name")
_LABEL = ("label", "class", "score", "target", "grade")


def _rows(path) -> list[tuple[int, list[str]]]:
    """Non-blank rows with their line numbers; any read or CSV error is one line."""
    src = os.fspath(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            out = []
            try:
                for row in reader:
                    if any(cell.strip() for cell in row):
                        out.append((reader.line_num, [cell.strip() for cell in row]))
            except csv.Error as exc:
                raise fail(src, f"row {reader.line_num}", f"malformed CSV ({exc})") from None
            return out
    except UnicodeDecodeError as exc:
        raise fail(src, None, f"not a UTF-8 text file ({exc.reason} at byte {exc.start})"
                   ) from None
    except OSError as exc:
        raise fail(src, None, f"cannot read ({exc.strerror or exc})") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _find(header: list[str], names: Sequence[str]) -> int | None:
    low = [h.lower() for h in header]
    for name in names:
        if name.lower() in low:
            return low.index(name.lower())
    return None


def _column(header: list[str], name: str, src: str) -> int:
    idx = _find(header, [name])
    if idx is None:
        raise fail(src, "header", f"no column {name!r} (columns found: {', '.join(header)})")
    return idx


def _cell(row: list[str], idx: int, line: int, src: str, header: list[str] | None) -> str:
    if idx >= len(row):
        what = f"column {header[idx]!r}" if header else f"column {idx + 1}"
        raise fail(src, f"row {line}", f"missing {what} ({len(row)} values)")
    return row[idx]


def _float(row, idx, line, src, header) -> float:
    text = _cell(row, idx, line, src, header)
    try:
        return float(text)
    except ValueError:
        name = header[idx] if header else f"column {idx + 1}"
        raise fail(src, f"row {line}", f"{name}={text!r} is not a number") from None


def _slide_key(value: str) -> str:
    """A table's slide/image cell as a slide id: ``dir/slide_000.svs`` -> ``slide_000``
    (only slide and image extensions are dropped: ``TCGA-01.1`` stays whole)."""
    p = Path(value)
    return p.stem if p.suffix.lower() in _IMAGE_SUFFIXES else p.name


def _point_rows(path, headerless_order: str, label: str, warnings: list[str]):
    src = os.fspath(path)
    rows = _rows(path)
    if not rows:
        return src, None, []
    if headerless_order not in ("xy", "yx"):
        raise ValueError("headerless_order must be 'xy' or 'yx'")
    first = rows[0][1]
    ix: int | None
    iy: int | None
    if len(first) >= 2 and _is_number(first[0]) and _is_number(first[1]):
        ix, iy = (0, 1) if headerless_order == "xy" else (1, 0)
        header, ig, il = None, None, None
    else:
        header, rows = first, rows[1:]
        ix, iy = _find(header, _X), _find(header, _Y)
        for idx, axis in ((ix, "x"), (iy, "y")):
            if idx is None:
                raise fail(src, "header", f"no {axis} column (columns found: {', '.join(header)})")
        ig, il = _find(header, _GROUP), _find(header, _POINT_LABEL)
    out = []
    for line, row in rows:
        try:  # a bad row costs itself (a warning), not the table
            group = _slide_key(_cell(row, ig, line, src, header)) if ig is not None else None
            lab = _cell(row, il, line, src, header) if il is not None else label
            point = Point(_float(row, ix, line, src, header), _float(row, iy, line, src, header),
                          lab or label, src, f"row {line}")
        except AnnotationError as exc:
            skip(warnings, exc)
            continue
        if _clean_point(point, warnings):  # NaN, inf, 1e30: skipped with a warning
            out.append((group, point))
    return src, ig, out


def read_point_table(path, slide_id: str | None = None, *,
                     headerless_order: Literal["xy", "yx"] = "yx",
                     label: str = UNCLASSIFIED) -> AnnotationSet:
    """Points of a CSV: columns ``x, y`` (or ``col, row``), optionally a slide/image column
    and a label column; or a headerless table of two (or more) numbers per row.

    Headerless tables are read as ``row, column`` (``y, x``) by default: that is the
    TUPAC16 and AMIDA13 mitosis ground-truth layout; pass ``headerless_order="xy"`` for
    tables written ``x, y`` (MITOS-ATYPIA-14).  A third headerless column (a confidence) is
    ignored.  With ``slide_id`` and a slide/image column, only that slide's rows are kept
    (cells compare by file stem); an empty table is zero points.
    """
    sink: list[str] = []
    _, ig, rows = _point_rows(path, headerless_order, label, sink)
    keep = [p for g, p in rows if slide_id is None or ig is None or g == slide_id]
    return AnnotationSet(points=keep, warnings=sink)


def points_by_slide(path, *, label: str = UNCLASSIFIED) -> dict[str, AnnotationSet]:
    """Split a point table with a slide/image column into one set per slide id."""
    sink: list[str] = []
    src, ig, rows = _point_rows(path, "xy", label, sink)
    if rows and ig is None:
        raise fail(src, "header", f"no slide/image column (one of: {', '.join(_GROUP)})")
    out: dict[str, AnnotationSet] = {}
    for g, p in rows:
        out.setdefault(g, AnnotationSet()).points.append(p)
    if out:  # skipped rows belong to no slide: report them once, with the first
        next(iter(out.values())).warnings.extend(sink)
    return out


def _looks_like_data(first: list[str], rest: list[tuple[int, list[str]]]) -> bool:
    """Whether a label table's first row is data, not a header: it names no known column and
    its label cell is a number or recurs in the label column below (``Tumor``, ``Normal``)."""
    if len(first) < 2 or _find(first, _ID + _LABEL) is not None:
        return False
    return _is_number(first[1]) or any(len(r) > 1 and r[1] == first[1] for _, r in rest)


def read_label_table(path, id_column: str | None = None, label_column: str | None = None
                     ) -> dict[str, float | str]:
    """Slide-level labels: ``{slide_id: score or class}`` (TUPAC16 proliferation scores).

    The id column defaults to the first of ``slide_id, slide, image, case, patient, id, ...``
    present (else the first column); the label column to the other column of a two-column
    table, else the first of ``label, class, score, target, grade``.  A headerless
    two-column table (numeric second cell in the first row) is ``id, label``.  Labels are
    floats when every one is a number, else strings.
    """
    src = os.fspath(path)
    rows = _rows(path)
    if not rows:
        raise fail(src, None, "empty label table")
    first = rows[0][1]
    headerless = id_column is None and label_column is None and _looks_like_data(first, rows[1:])
    ilab: int | None
    if headerless:
        header, iid, ilab = None, 0, 1
    else:
        header, rows = first, rows[1:]
        iid = _column(header, id_column, src) if id_column else (_find(header, _ID) or 0)
        if label_column:
            ilab = _column(header, label_column, src)
        elif len(header) == 2:
            ilab = 1 - iid
        else:
            ilab = _find(header, _LABEL)
            if ilab is None:
                raise fail(src, "header", "cannot tell the label column (columns found: "
                           f"{', '.join(header)}); pass label_column=")
    seen: dict[str, int] = {}
    values: dict[str, str] = {}
    for line, row in rows:
        key, value = _cell(row, iid, line, src, header), _cell(row, ilab, line, src, header)
        if not key:
            raise fail(src, f"row {line}", "empty id")
        if not value:
            raise fail(src, f"row {line}", f"empty label for {key!r}")
        if key in seen:
            raise fail(src, f"row {line}", f"{key!r} listed twice (first at row {seen[key]})")
        seen[key] = line
        values[key] = value
    if all(_is_number(v) for v in values.values()):
        return {k: float(v) for k, v in values.items()}
    return dict[str, float | str](values)


@dataclass(frozen=True, eq=False)
class ChestXray:
    """Images and their multi-hot findings; unpacks as ``paths, multi_hot, classes``."""

    image_paths: list[Path]
    multi_hot: np.ndarray          # (N, C) uint8
    classes: tuple[str, ...]
    patient_ids: list[str]         # for patient-level splits; "" when the column is absent

    def __iter__(self) -> Iterator:
        return iter((self.image_paths, self.multi_hot, self.classes))


def _image_index(image_dir: Path) -> dict[str, Path]:
    """Every file under ``image_dir`` by name (the NIH download nests ``images_001/images``)."""
    out: dict[str, Path] = {}
    for root, _, files in os.walk(image_dir):
        for name in files:
            out.setdefault(name, Path(root) / name)
    return out


def read_chestxray_csv(path, image_dir=None, classes: Sequence[str] = DEFAULT_CXR14
                       ) -> ChestXray:
    """Read a ChestX-ray14 ``Data_Entry`` CSV: ``Image Index`` and ``Finding Labels``
    (findings joined by ``|``; ``No Finding`` is all zeros).

    A finding outside ``classes`` is an error naming row and finding.  With ``image_dir``
    every image must exist there (directly or in a subfolder); the first missing one is
    named.
    """
    src = os.fspath(path)
    classes = tuple(classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"duplicate class names in {classes}")
    col = {c: i for i, c in enumerate(classes)}
    rows = _rows(path)
    if not rows:
        raise fail(src, None, "empty CSV")
    header, rows = rows[0][1], rows[1:]
    ii, il = _column(header, "Image Index", src), _column(header, "Finding Labels", src)
    ip = _find(header, ["Patient ID"])
    names, patients = [], []
    hot = np.zeros((len(rows), len(classes)), np.uint8)
    first_row: dict[str, int] = {}
    for n, (line, row) in enumerate(rows):
        name, findings = _cell(row, ii, line, src, header), _cell(row, il, line, src, header)
        if not name:
            raise fail(src, f"row {line}", "empty Image Index")
        if name in first_row:
            raise fail(src, f"row {line}", f"{name} listed twice (first at row {first_row[name]})")
        first_row[name] = line
        labels = [s.strip() for s in findings.split("|") if s.strip()]
        if not labels:
            raise fail(src, f"row {line}", f"empty Finding Labels for {name}")
        if NO_FINDING in labels and len(labels) > 1:
            raise fail(src, f"row {line}", f"{NO_FINDING!r} together with findings {findings!r}")
        for lab in labels:
            if lab == NO_FINDING:
                continue
            if lab not in col:
                raise fail(src, f"row {line}", f"unknown finding {lab!r} (known: "
                           f"{', '.join(classes)}, {NO_FINDING})")
            hot[n, col[lab]] = 1
        names.append(name)
        patients.append(_cell(row, ip, line, src, header) if ip is not None else "")
    if image_dir is None:
        return ChestXray([Path(n) for n in names], hot, classes, patients)
    root = Path(image_dir)
    paths = [root / n for n in names]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        index = _image_index(root)
        for i in missing:
            if names[i] not in index:
                raise fail(src, f"row {rows[i][0]}", f"image {names[i]} not found in {root}")
            paths[i] = index[names[i]]
    return ChestXray(paths, hot, classes, patients)

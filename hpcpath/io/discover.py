"""Turn the paths a user typed into slide sources, one per slide.

A folder is searched (not recursively) for files with slide extensions and for DICOM series
(sub-folders of .dcm files); a folder that is itself a DICOM series is one slide.  Single-channel TIFFs in a
folder are annotation masks and are left out.  Files named explicitly are always tried,
whatever their extension, so a non-slide gets a clear error rather than being silently
skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcpath.io.slide import _DICOM_SUFFIXES, slide_id_for

__all__ = ["SLIDE_SUFFIXES", "discover_slides"]

SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".ptif", ".qptiff",
}


def _is_label_mask(path: Path) -> bool:
    """A single-channel TIFF next to the slides is an annotation mask (CAMELYON's
    ``tumor_001_mask.tif``, our ``.tumor.tif``), not a slide to tile."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return page.samplesperpixel == 1 and page.photometric in (0, 1)
    except Exception:  # noqa: BLE001 - unreadable: let the slide opener report it
        return False


def _is_dicom_series(path: Path) -> bool:
    """A folder whose visible files are all DICOM (a mixed folder is a folder of slides)."""
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() in _DICOM_SUFFIXES for p in files)


def discover_slides(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders to an ordered, de-duplicated list of slide paths.

    Missing paths are kept: opening them later yields the per-slide "no such file" error, so
    one typo does not stop the rest of a run.
    """
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and not _is_dicom_series(path):
            for child in sorted(path.iterdir()):
                if child.is_file() and child.suffix.lower() in SLIDE_SUFFIXES:
                    if not _is_label_mask(child):
                        found.append(child)
                elif _is_dicom_series(child):
                    found.append(child)
        else:
            found.append(path)
    seen: set[Path] = set()
    unique = []
    for p in found:
        key = p.resolve() if p.exists() else p
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def duplicate_ids(paths: list[Path]) -> dict[str, list[Path]]:
    """Slide ids shared by more than one path (their stores would collide), ids that differ
    only in case included: they are one folder on a case-insensitive file system."""
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        by_id.setdefault(slide_id_for(p).casefold(), []).append(p)
    return {k: v for k, v in by_id.items() if len(v) > 1}  # keyed by the casefolded id

"""Pair annotation files with slides by name: ``slide_000.tumor.xml`` -> ``slide_000``.

A file belongs to the slide whose id (the slide's file stem) starts its name and is followed
by a separator (``.``, ``_``, ``-`` or space: CAMELYON16's ``tumor_001_mask.tif`` matches
``tumor_001``); the longest such id wins, so ``tumor_0011.xml`` never goes to ``tumor_001``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from hpcpath.annotations._errors import AnnotationError

__all__ = ["match_annotations", "slide_for"]

_SEPARATORS = "._- "


def _short(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def slide_for(name: str, slide_ids: Iterable[str]) -> str | None:
    """The slide id an annotation file name belongs to, or None."""
    best = None
    for s in slide_ids:
        if name == s or (name.startswith(s) and len(name) > len(s) and name[len(s)] in _SEPARATORS):
            if best is None or len(s) > len(best):
                best = s
    return best


def match_annotations(slides: Iterable[str], annotation_files: Iterable[str | os.PathLike]
                      ) -> dict[str, list[Path]]:
    """``{slide_id: [annotation paths]}`` for every slide (an empty list when it has none).

    An annotation file that matches no slide is an error (it would otherwise be silently
    unused): one line naming it and counting the others.
    """
    ids = list(dict.fromkeys(slides))
    out: dict[str, list[Path]] = {s: [] for s in ids}
    unmatched: list[Path] = []
    for f in annotation_files:
        p = Path(f)
        s = slide_for(p.name, ids)
        (unmatched if s is None else out[s]).append(p)
    if unmatched:
        others = [q.name for q in unmatched[1:]]
        more = f"; {len(others)} more unmatched: {_short(others)}" if others else ""
        raise AnnotationError(f"no slide matches this annotation file (slide ids: "
                              f"{_short(ids) or 'none'}){more}", unmatched[0])
    return {s: sorted(v) for s, v in out.items()}

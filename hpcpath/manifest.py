"""The run manifest: one JSON file per output folder, one record per slide.

It says what happened (complete, failed, with tile count, seconds and the one-line error) and
is rewritten atomically after every slide, so it stays readable if the run is killed.  The
store's own completion marker, not the manifest, decides whether a rerun skips a slide.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcpath.files import write_json

__all__ = ["Manifest", "SlideRecord", "MANIFEST_NAME"]

MANIFEST_NAME = "hpcpath-manifest.json"


@dataclass
class SlideRecord:
    slide_id: str
    source: str
    status: str  # "complete" | "empty" (nothing to tile; store still made) | "failed"
    tiles: int | None
    seconds: float
    error: str | None
    params_key: str | None = None
    reused: bool = False
    finished: float = field(default_factory=time.time)

    @classmethod
    def failure(cls, slide_id: str, source, error: str, seconds: float = 0.0) -> SlideRecord:
        return cls(slide_id, str(source), "failed", None, round(seconds, 3), error)


@dataclass
class Manifest:
    path: Path
    slides: dict[str, SlideRecord]

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> Manifest:
        path = Path(out_dir) / MANIFEST_NAME
        slides: dict[str, SlideRecord] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
                for sid, rec in data.get("slides", {}).items():
                    slides[sid] = SlideRecord(**rec)
            except (ValueError, TypeError):
                slides = {}  # an unreadable manifest is rebuilt; stores are the truth
        return cls(path, slides)

    def update(self, rec: SlideRecord) -> None:
        rec.seconds = round(rec.seconds, 3)
        self.slides[rec.slide_id] = rec

    def save(self) -> None:
        data = {
            "format": "hpcpath-manifest/1",
            "slides": {k: asdict(v) for k, v in sorted(self.slides.items())},
        }
        # disk full, folder turned read-only: one line, the old manifest kept
        write_json(self.path, data, error="cannot write the manifest: {reason}")

"""The per-slide Zarr v3 store: layout, creation, completion marker, and a reader.

Layout (docs/store-layout.md has the full description)::

    <slide_id>.zarr/
      zarr.json                 attributes["hpcpath"]: version, slide, tiling, tissue, complete
      image/                    OME-NGFF 0.5 multiscale pyramid, arrays "0", "1", ... (c, y, x)
      tissue/mask               (h, w) uint8, 1 = tissue; attrs: level-0 px per mask px
      tiles/index               (N, 5) int64: x, y (level 0), level, row, col (tile grid)
      tiles/tissue_fraction     (N,) float32
      tiles/images              (N, T, T, 3) uint8, chunked along N

The completion marker is ``attributes["hpcpath"]["complete"] = true``, written last, after
every chunk is known to be written; a store without it is partial and gets redone.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

import hpcpath.codecs  # noqa: F401  (registers the JPEG codec for readers)
from hpcpath._version import __version__
from hpcpath.errors import HpcpathError

__all__ = [
    "INDEX_COLUMNS",
    "SlideStore",
    "open_store",
    "store_path",
    "is_complete",
    "mark_complete",
    "check_output_dir",
    "slide_source",
    "remove_store",
]

INDEX_COLUMNS = ("x", "y", "level", "row", "col")
NGFF_VERSION = "0.5"


def store_path(out_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(out_dir) / f"{slide_id}.zarr"


def check_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and prove it writable, before any work is submitted."""
    from hpcpath.errors import OutputError

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".hpcpath-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output folder is not writable ({exc.strerror or exc})", out) from None
    return out


def slide_source(store: str | os.PathLike, meta: dict, slide_dirs: list[Path] = ()) -> Path | None:
    """The slide file a store was made from: from ``slide_dirs``, else the tiling manifest
    next to the store (stores keep only the file name, for privacy)."""
    import json

    from hpcpath.manifest import MANIFEST_NAME

    name = meta["slide"]["source_name"]
    for d in slide_dirs:
        if (Path(d) / name).exists():
            return Path(d) / name
    manifest = Path(store).parent / MANIFEST_NAME
    if manifest.exists():
        try:
            rec = json.loads(manifest.read_text()).get("slides", {}).get(meta["slide"]["slide_id"])
        except ValueError:
            rec = None
        if rec and Path(rec["source"]).exists():
            return Path(rec["source"])
    return None


def _meta(root: zarr.Group) -> dict[str, Any]:
    return dict(root.attrs.get("hpcpath", {}))


def is_complete(path: str | os.PathLike, params_key: str | None = None) -> bool:
    """True when the store exists, carries the completion marker, and (if given) matches
    the tiling parameters it would be made with now."""
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception:  # noqa: BLE001 - missing or unreadable means "not complete"
        return False
    meta = _meta(root)
    if not meta.get("complete"):
        return False
    return params_key is None or meta.get("params_key") == params_key


def mark_complete(path: str | os.PathLike, group: str = "", attr: str = "hpcpath") -> None:
    """Set ``attributes[attr]["complete"] = True`` on a group: the last write of a stage."""
    root = zarr.open_group(str(path), mode="r+")
    node = root[group] if group else root
    meta = dict(node.attrs[attr])
    meta["complete"] = True
    node.attrs[attr] = meta


def remove_store(path: str | os.PathLike) -> None:
    """Delete a (partial) store; rename first so a crash mid-delete leaves no half store
    under the real name."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def ngff_multiscales(name: str, scales: list[float], mpp: tuple[float, float] | None) -> dict:
    """OME-NGFF 0.5 ``multiscales`` metadata for a (c, y, x) pyramid."""
    unit = "micrometer" if mpp else None
    mx, my = mpp if mpp else (1.0, 1.0)
    space = {"type": "space", **({"unit": unit} if unit else {})}
    return {
        "version": NGFF_VERSION,
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", **space},
                    {"name": "x", **space},
                ],
                "datasets": [
                    {
                        "path": str(i),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, my * s, mx * s]}
                        ],
                    }
                    for i, s in enumerate(scales)
                ],
            }
        ],
        "omero": {
            "channels": [
                {"label": c, "color": col, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                for c, col in (("R", "FF0000"), ("G", "00FF00"), ("B", "0000FF"))
            ],
            "rdefs": {"model": "color"},
        },
    }


@dataclass
class SlideStore:
    """A slide store opened for reading.  Arrays stay lazy (zarr) until indexed."""

    path: Path
    root: zarr.Group

    @property
    def meta(self) -> dict[str, Any]:
        return _meta(self.root)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def tiles(self) -> zarr.Array:
        return self.root["tiles/images"]

    @property
    def index(self) -> np.ndarray:
        return self.root["tiles/index"][:]

    @property
    def tissue_fraction(self) -> np.ndarray:
        return self.root["tiles/tissue_fraction"][:]

    @property
    def tissue_mask(self) -> np.ndarray:
        return self.root["tissue/mask"][:].astype(bool)

    @property
    def pyramid(self) -> list[zarr.Array]:
        if "image" not in self.root:
            return []
        image = self.root["image"]
        n = len(image.attrs["ome"]["multiscales"][0]["datasets"])
        return [image[str(i)] for i in range(n)]

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def tiles_dask(self):
        """The tile array as a dask array, one block per Zarr chunk."""
        import dask.array as da

        return da.from_zarr(self.tiles)


def open_store(path: str | os.PathLike, *, require_complete: bool = True) -> SlideStore:
    """Open ``<slide_id>.zarr`` for reading.  Partial stores are refused unless asked for."""
    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001
        raise HpcpathError(f"not an hpcpath slide store ({type(exc).__name__})", path) from None
    store = SlideStore(path, root)
    if "hpcpath" not in root.attrs:
        raise HpcpathError("not an hpcpath slide store (no hpcpath attributes)", path)
    if require_complete and not store.complete:
        raise HpcpathError("store is incomplete (its tiling run did not finish); rerun it", path)
    return store


def store_version() -> str:
    return __version__

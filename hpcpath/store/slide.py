"""The per-slide Zarr v3 store: layout, creation, completion marker, and a reader.

This is the one module that opens a store's Zarr groups: stages create, open and mark
stores through it and read their metadata as typed objects (:mod:`hpcpath.store.meta`).

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

import errno
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr
from zarr.core.chunk_key_encodings import ChunkKeyEncodingParams

import hpcpath.codecs  # noqa: F401  (registers the JPEG codec for readers)
from hpcpath._version import __version__
from hpcpath.errors import HpcpathError
from hpcpath.store.meta import DATASET_ATTR, ROOT_ATTR, DatasetMeta, StoreMeta

__all__ = [
    "INDEX_COLUMNS",
    "SlideStore",
    "open_store",
    "open_group",
    "create_slide_store",
    "create_image_store",
    "mask_scratch",
    "MaskScratch",
    "MASK_CHUNK",
    "read_meta",
    "create_dataset",
    "open_dataset_group",
    "dataset_meta",
    "store_path",
    "is_complete",
    "mark_complete",
    "check_output_dir",
    "slide_source",
    "remove_store",
]

INDEX_COLUMNS = ("x", "y", "level", "row", "col")


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


def slide_source(store: str | os.PathLike, meta: StoreMeta,
                 slide_dirs: Sequence[str | os.PathLike] = ()) -> Path | None:
    """The slide file a store was made from: from ``slide_dirs``, else the tiling manifest
    next to the store (stores keep only the file name, for privacy)."""
    import json

    from hpcpath.manifest import MANIFEST_NAME

    name = meta.slide.source_name
    for d in slide_dirs:
        if (Path(d) / name).exists():
            return Path(d) / name
    manifest = Path(store).parent / MANIFEST_NAME
    if manifest.exists():
        try:
            rec = json.loads(manifest.read_text()).get("slides", {}).get(meta.slide_id)
        except ValueError:
            rec = None
        if rec and Path(rec["source"]).exists():
            return Path(rec["source"])
    return None


def _meta(root: zarr.Group) -> dict[str, Any]:
    return dict(root.attrs.get(ROOT_ATTR, {}))  # type: ignore[arg-type]


def open_group(path: str | os.PathLike, mode: Literal["r", "r+"] = "r", group: str = "") -> zarr.Group:
    """A store's root group (or the sub-group ``group``) for a worker task to read or write
    arrays: the one place a store's Zarr group is opened."""
    root = zarr.open_group(str(path), mode=mode)
    if not group:
        return root
    node = root[group]
    if not isinstance(node, zarr.Group):
        raise HpcpathError(f"{group} is not a group", path)
    return node


def read_meta(path: str | os.PathLike | zarr.Group) -> StoreMeta:
    """A slide store's root attributes as a typed :class:`StoreMeta`."""
    root = path if isinstance(path, zarr.Group) else open_group(path)
    return StoreMeta.from_dict(_meta(root))


def is_complete(path: str | os.PathLike, params_key: str | None = None) -> bool:
    """True when the store exists, carries the completion marker, and (if given) matches
    the tiling parameters it would be made with now."""
    try:
        root = open_group(path)
    except Exception:  # noqa: BLE001 - missing or unreadable means "not complete"
        return False
    meta = _meta(root)
    if not meta.get("complete"):
        return False
    return params_key is None or meta.get("params_key") == params_key


def mark_complete(path: str | os.PathLike, group: str = "", attr: str = "hpcpath") -> None:
    """Set ``attributes[attr]["complete"] = True`` on a group: the last write of a stage."""
    node = open_group(path, "r+", group)
    meta = dict(node.attrs[attr])  # type: ignore[arg-type]
    meta["complete"] = True
    node.attrs[attr] = meta


_PYRAMID_CHUNK = 1024
MASK_CHUNK = 1024  # tissue-mask px per chunk side: the block of blockwise tissue detection
INDEX_CHUNK = 4096  # rows per chunk of tiles/index and tiles/tissue_fraction
# tile-array chunk files side by side (c.K.0.0.0), not in K/0/0/ folders: three fewer
# directories created per chunk file, costly on a parallel file system's metadata server
FLAT_CHUNK_KEYS: ChunkKeyEncodingParams = {"name": "default", "separator": "."}


class MaskScratch:
    """A temporary (h, w) uint8 array in a raw file, read and written a window at a time:
    blockwise tissue detection keeps its intermediates here rather than in memory.

    The file is mapped (shared) and each access copies the window in or out, then hands the
    rows it touched back (``MADV_DONTNEED``): their pages stay in the page cache and the
    file, not in this process's RSS, so memory stays a window.  Plain memory copies on the
    calling thread -- no decoded chunk, codec buffer or reader thread (a Zarr array here
    left the worker's RSS growing by ~1 MB per block through its reader threads), and no
    system call per row (a ``pread``/``pwrite`` per row cost ~0.2 s of a 50k slide's plan)."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int]) -> None:
        import mmap
        import weakref

        self.shape = (int(shape[0]), int(shape[1]))
        self.path = Path(path)
        size = self.shape[0] * self.shape[1]
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _reserve(fd, size)
            self._map = mmap.mmap(fd, size) if size else None
        finally:
            os.close(fd)  # the mapping keeps the file
        self._array = (np.frombuffer(self._map, np.uint8) if self._map is not None
                       else np.zeros(0, np.uint8)).reshape(self.shape)
        self._close = weakref.finalize(self, _unmap, self.__dict__)

    def _window(self, key) -> tuple[int, int, int, int]:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, _ = rows.indices(self.shape[0])
        c0, c1, _ = cols.indices(self.shape[1])
        return r0, max(r0, r1), c0, max(c0, c1)

    def _release(self, r0: int, r1: int) -> None:
        """Drop rows [r0, r1)'s pages from this process (they stay in the file)."""
        import mmap

        if self._map is None or r1 <= r0:
            return
        w, page = self.shape[1], mmap.PAGESIZE
        a = (r0 * w) // page * page
        b = min(len(self._map), -(-(r1 * w) // page) * page)
        self._map.madvise(mmap.MADV_DONTNEED, a, b - a)

    def __getitem__(self, key) -> np.ndarray:
        r0, r1, c0, c1 = self._window(key)
        out = np.array(self._array[r0:r1, c0:c1])
        self._release(r0, r1)
        return out

    def __setitem__(self, key, value) -> None:
        r0, r1, c0, c1 = self._window(key)
        self._array[r0:r1, c0:c1] = np.asarray(value, np.uint8)
        self._release(r0, r1)

    def close(self) -> None:
        self._close()


def _reserve(fd: int, size: int) -> None:
    """Give the file its ``size`` bytes of disk now (zeros): a write through a mapping into a
    file the disk cannot grow is a SIGBUS that kills the process, where a full disk must be
    this OSError ("No space left on device") and a one-line failure of the slide."""
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)  # no fallocate here: sparse, reads as zeros


def _unmap(state: dict) -> None:
    state["_array"] = None  # the buffer export first: a mapping with exports cannot close
    if state.get("_map") is not None:
        state["_map"].close()


def mask_scratch(folder: str | os.PathLike, name: str, shape: tuple[int, int]) -> MaskScratch:
    """A :class:`MaskScratch` array ``name`` in ``folder`` (a temporary folder)."""
    return MaskScratch(Path(folder) / name, shape)


def create_slide_store(path: str | os.PathLike, meta: StoreMeta, *, mask: Any,
                       index: np.ndarray, tissue_fraction: np.ndarray, tile_layout: dict[str, Any],
                       tile_codec: str, pyramid: list[tuple[int, int]],
                       pyramid_downsample: float) -> zarr.Group:
    """Create a slide store's whole layout (docs/store-layout.md): root attributes (marked
    incomplete), tissue mask, tile index and fractions, an empty tile array and, when
    ``pyramid`` lists (height, width) levels, an empty OME-NGFF pyramid.

    ``tile_layout`` is the tile array's ``chunks`` (and ``shards``) and codecs
    (:mod:`hpcpath.codecs`); ``tile_codec`` the name recorded in its attributes.  ``mask``
    is any 2-D array that slices (numpy, or a :class:`MaskScratch`): it is copied a chunk
    at a time, never whole."""
    from hpcpath.codecs import array_codecs

    assert not meta.complete, "a store is created incomplete; mark_complete() comes last"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs[ROOT_ATTR] = meta.to_dict()
    mh, mw = mask.shape
    tissue = root.create_group("tissue")
    step = MASK_CHUNK
    arr = tissue.create_array(
        "mask", shape=(mh, mw), dtype="uint8", fill_value=0,
        chunks=(max(1, min(mh, step)), max(1, min(mw, step))),
        attributes={"downsample": list(meta.tissue.downsample),
                    "values": {"0": "background", "1": "tissue"}},
    )
    for r0 in range(0, mh, step):
        for c0 in range(0, mw, step):
            block = np.asarray(mask[r0 : r0 + step, c0 : c0 + step])
            arr[r0 : r0 + step, c0 : c0 + step] = block.astype(np.uint8, copy=False)
    n = len(index)
    tiles = root.create_group("tiles")
    # a tile task reads the index rows of its own tiles: small chunks (160 kB decoded), so
    # that is not a decode of the whole slide's index (2.6 MB at 65536 rows) per task
    tiles.create_array(
        "index", data=index.reshape(-1, 5), chunks=(max(1, min(n, INDEX_CHUNK)), 5),
        attributes={"columns": list(INDEX_COLUMNS), "coordinates": "level-0 pixels"},
    )
    tiles.create_array("tissue_fraction", data=tissue_fraction, chunks=(max(1, min(n, INDEX_CHUNK)),))
    t = meta.tiling.tile_size
    tiles.create_array(
        "images", shape=(n, t, t, 3), dtype="uint8", fill_value=0, config={"write_empty_chunks": True},
        attributes={"axes": ["tile", "y", "x", "c"], "codec": tile_codec}, chunk_key_encoding=FLAT_CHUNK_KEYS,
        **tile_layout,
    )
    if pyramid:
        image = root.create_group("image")
        scales = [pyramid_downsample * 2**i for i in range(len(pyramid))]
        image.attrs["ome"] = ngff_multiscales(meta.slide_id, scales, meta.slide.mpp)
        for i, (h, w) in enumerate(pyramid):
            image.create_array(
                str(i), shape=(3, h, w), dtype="uint8",
                chunks=(3, min(h, _PYRAMID_CHUNK), min(w, _PYRAMID_CHUNK)),
                fill_value=255, dimension_names=["c", "y", "x"],
                **array_codecs("blosc-lz4"),
            )
    return root


def create_image_store(path: str | os.PathLike) -> zarr.Group:
    """An image-dataset store (no slide: ``attributes["hpcpath"]["kind"] = "images"``)."""
    remove_store(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs[ROOT_ATTR] = {"version": __version__, "kind": "images", "complete": True}
    return root


def pyramid_levels(image: zarr.Group) -> list[zarr.Array]:
    """The arrays of an OME-NGFF ``image`` group, finest first."""
    ome: Any = image.attrs["ome"]
    n = len(ome["multiscales"][0]["datasets"])
    return [image[str(i)] for i in range(n)]  # type: ignore[misc]


# ----------------------------------------------------------------------------- datasets
def create_dataset(store: str | os.PathLike, name: str, meta: DatasetMeta) -> zarr.Group:
    """(Re)create ``datasets/<name>`` with its attributes (incomplete); arrays are the
    caller's (they differ per rule)."""
    root = open_group(store, "r+")
    group = root.require_group("datasets")
    if name in group:
        del group[name]
    g = group.create_group(name)
    g.attrs[DATASET_ATTR] = meta.replace(complete=False).to_dict()
    return g


def open_dataset_group(store: str | os.PathLike, name: str, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    return open_group(store, mode, f"datasets/{name}")


def dataset_meta(group: zarr.Group) -> DatasetMeta:
    """The typed attributes of an open ``datasets/<name>`` group."""
    return DatasetMeta.from_dict(group.attrs[DATASET_ATTR])  # type: ignore[arg-type]


def finish_dataset(store: str | os.PathLike, name: str) -> None:
    """Mark ``datasets/<name>`` complete: the last write of a dataset build."""
    mark_complete(store, f"datasets/{name}", DATASET_ATTR)


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
    """OME-NGFF 0.5 ``multiscales`` metadata for the (c, y, x) RGB pyramid: scales and
    pixel-centre translations as :func:`hpcpath.ngff.multiscales` places every layer."""
    from hpcpath.ngff import multiscales

    return multiscales(name, scales, mpp)


@dataclass
class SlideStore:
    """A slide store opened for reading.  Arrays stay lazy (zarr) until indexed."""

    path: Path
    root: zarr.Group

    @property
    def meta(self) -> dict[str, Any]:
        """The root attributes as stored (JSON); :attr:`metadata` is the typed form."""
        return _meta(self.root)

    @property
    def metadata(self) -> StoreMeta:
        return StoreMeta.from_dict(self.meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def tiles(self) -> zarr.Array:
        return self.root["tiles/images"]  # type: ignore[return-value]

    @property
    def mask_downsample(self) -> tuple[float, float]:
        """Level-0 px per tissue-mask px (x, y)."""
        dx, dy = np.asarray(self.root["tissue/mask"].attrs["downsample"], float)
        return float(dx), float(dy)

    @property
    def index(self) -> np.ndarray:
        return np.asarray(self.root["tiles/index"][:])

    @property
    def tissue_fraction(self) -> np.ndarray:
        return np.asarray(self.root["tiles/tissue_fraction"][:])

    @property
    def tissue_mask(self) -> np.ndarray:
        return np.asarray(self.root["tissue/mask"][:]).astype(bool)

    @property
    def pyramid(self) -> list[zarr.Array]:
        if "image" not in self.root:
            return []
        return pyramid_levels(self.root["image"])  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    def tiles_dask(self):
        """The tile array as a dask array, one block per file: a shard of a passthrough
        store (one tile per chunk: a block per chunk would be a task per tile), else a chunk."""
        import dask.array as da

        arr = self.tiles
        return da.from_zarr(arr, chunks=arr.shards or arr.chunks)


def open_store(path: str | os.PathLike, *, require_complete: bool = True,
               mode: Literal["r", "r+"] = "r") -> SlideStore:
    """Open ``<slide_id>.zarr`` for reading (``mode="r+"``: a task that writes its own
    chunks).  Partial stores are refused unless asked for."""
    path = Path(path)
    try:
        root = open_group(path, mode)
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

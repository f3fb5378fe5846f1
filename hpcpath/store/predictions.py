"""The ``predictions/<name>`` group of a slide store: layout, creation, reading.

::

    predictions/<name>/        attributes["hpcpath_predictions"]: complete (written last),
    │                          params_key, mode, source, grid, model, config, classes,
    │                          score_channel, n_windows, blocks, summary (once complete)
    ├── windows                (N, 2) int32 row, col of every predicted window (row-major)
    ├── heatmap                (C, rows, cols) float32 per-window probabilities, NaN where no
    │                          window was predicted (window mode); chunks of whole task rows
    ├── detections             (D, 3) float64 x, y (level 0), score (points models)
    └── tasks/<k>              one group per task, written by that task alone: attributes =
                               where it ran (CUDA_VISIBLE_DEVICES, worker, host, Slurm job),
                               windows, seconds, io_wait_s; "points" (K, 3) x, y, score of
                               two-stage candidates

Every task writes only its own chunks and its own ``tasks/<k>`` group, so a task retried on
another worker rewrites the same bytes, and concurrent tasks never share a metadata file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.errors import HpcpathError
from hpcpath.grid import WindowGrid
from hpcpath.store.meta import PREDICTIONS_ATTR as ATTR
from hpcpath.store.meta import PredictionsMeta
from hpcpath.store.slide import open_group

__all__ = ["ATTR", "Predictions", "open_predictions", "predictions_complete", "create_group",
           "open_predictions_group", "predictions_meta", "write_predictions_meta",
           "write_task", "read_tasks"]

GROUP = "predictions"


def open_predictions_group(store: str | os.PathLike, name: str, mode: str = "r"):
    return open_group(store, mode, f"{GROUP}/{name}")  # type: ignore[arg-type]


def predictions_meta(group) -> PredictionsMeta:
    """The typed attributes of an open ``predictions/<name>`` group."""
    return PredictionsMeta.from_dict(group.attrs[ATTR])


def write_predictions_meta(group, meta: PredictionsMeta) -> None:
    """Replace the group's attributes; with ``complete=True`` this is the marker, last."""
    group.attrs[ATTR] = meta.to_dict()


@dataclass
class Predictions:
    """One store's predictions under one name, opened for reading (arrays stay lazy)."""

    store: Path
    name: str
    group: Any

    @property
    def info(self) -> dict[str, Any]:
        """The attributes as stored (JSON); :attr:`meta` is the typed form."""
        return dict(self.group.attrs[ATTR])

    @property
    def meta(self) -> PredictionsMeta:
        return predictions_meta(self.group)

    @property
    def complete(self) -> bool:
        return bool(self.info.get("complete"))

    @property
    def grid(self) -> WindowGrid:
        return self.meta.grid

    @property
    def windows(self) -> np.ndarray:
        return self.group["windows"][:]

    @property
    def heatmap(self):
        """zarr array (C, rows, cols), or None for two-stage predictions."""
        return self.group["heatmap"] if "heatmap" in self.group else None

    @property
    def score_channel(self) -> int:
        return self.meta.score_channel

    def window_scores(self, channel: int | None = None) -> np.ndarray:
        """(N,) score of every predicted window, in ``windows`` order."""
        heat = self.heatmap
        if heat is None:
            raise HpcpathError(f"predictions {self.name!r} have no heatmap (two-stage)", self.store)
        rc = self.windows
        ch = self.score_channel if channel is None else channel
        out = np.empty(len(rc), np.float32)
        rows = rc[:, 0]
        for r0 in range(0, heat.shape[1], 1024):  # a band of rows at a time: bounded memory
            sel = (rows >= r0) & (rows < r0 + 1024)
            if sel.any():
                band = heat[ch, r0 : r0 + 1024, :]
                out[sel] = band[rows[sel] - r0, rc[sel, 1]]
        return out

    @property
    def detections(self) -> np.ndarray:
        return self.group["detections"][:] if "detections" in self.group else np.zeros((0, 3))

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.meta.summary)


def open_predictions(store: str | os.PathLike, name: str, *, require_complete: bool = True
                     ) -> Predictions:
    store = Path(store)
    try:
        g = open_predictions_group(store, name)
    except Exception:  # noqa: BLE001 - missing store or group: one message
        raise HpcpathError(f"no predictions named {name!r} in this store", store) from None
    p = Predictions(store, name, g)
    if ATTR not in g.attrs:
        raise HpcpathError(f"predictions/{name} is not an hpcpath predictions group", store)
    if require_complete and not p.complete:
        raise HpcpathError(f"predictions/{name} are incomplete (the run did not finish); rerun it", store)
    return p


def predictions_complete(store: str | os.PathLike, name: str, params_key: str | None = None) -> bool:
    try:
        p = open_predictions(store, name)
    except HpcpathError:
        return False
    return params_key is None or p.meta.params_key == params_key


def create_group(store: str, name: str, meta: PredictionsMeta, windows: np.ndarray,
                 heatmap_shape: tuple[int, int, int] | None, chunk_rows: int):
    """(Re)create ``predictions/<name>``, marked incomplete, with its windows and an empty
    NaN heatmap whose chunks are whole task rows."""
    from hpcpath.codecs import array_codecs

    root = open_group(store, "r+")
    preds = root.require_group(GROUP)
    if name in preds:
        del preds[name]
    g = preds.create_group(name)
    write_predictions_meta(g, meta.replace(complete=False))
    n = len(windows)
    g.create_array("windows", data=np.asarray(windows, np.int32).reshape(-1, 2),
                   chunks=(max(1, min(n, 1 << 20)), 2), attributes={"columns": ["row", "col"]})
    if heatmap_shape is not None:
        c, rows, cols = heatmap_shape
        g.create_array(
            "heatmap", shape=(c, rows, cols), dtype="float32", fill_value=float("nan"),
            chunks=(c, max(1, min(rows, chunk_rows)), max(1, cols)),
            dimension_names=["c", "y", "x"], attributes={"classes": list(meta.classes)},
            **array_codecs("blosc-lz4"),
        )
    g.require_group("tasks")
    return g


def write_task(group, k: int, record: dict[str, Any], points: np.ndarray | None = None) -> None:
    """This task's record (and candidate points), replacing any earlier attempt's.

    Two attempts of one task can write at once: when Slurm kills a worker job, the scheduler
    reruns its task elsewhere while the dying process may still be finishing it.  Both write
    the same values, so each step overwrites in place (no delete-then-create that the other
    attempt could interleave with), and a clash is retried rather than failing the slide."""
    import time

    for attempt in range(5):
        try:
            t = group.require_group("tasks").require_group(f"{k:06d}")
            if points is not None:
                pts = np.asarray(points, np.float64).reshape(-1, 3)
                t.create_array("points", data=pts if len(pts) else np.zeros((0, 3)),
                               chunks=(max(1, len(pts)), 3), overwrite=True)
            t.attrs["task"] = record  # last: a record means the task finished
            return
        except Exception:  # noqa: BLE001 - a concurrent attempt of the same task; retry
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def read_tasks(group) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    """Every finished task's (record, points), in task order."""
    tasks = group["tasks"]
    out = []
    for key in sorted(tasks.group_keys()):
        t = tasks[key]
        if "task" not in t.attrs:
            continue
        pts = t["points"][:] if "points" in t else None
        out.append((dict(t.attrs["task"]), pts))
    return out

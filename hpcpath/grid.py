"""Where windows go: the sliding-window grid over a slide, pure and testable without a slide.

Window ``(r, c)`` is a ``patch x patch`` image read at ``downsample`` (level-0 pixels per
patch pixel) whose top-left corner is level-0 ``(c * step, r * step)`` with
``step = stride * downsample``; its centre is ``(c * step + side / 2, r * step + side / 2)``
with ``side = patch * downsample``.  Only whole windows are on the grid (as for tiles).  The
heatmap stores one value per window at ``[r, c]``, so it is grid-shaped, never
full-resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["WindowGrid", "window_grid", "tissue_windows", "task_blocks"]


@dataclass(frozen=True)
class WindowGrid:
    patch: int
    downsample: float
    stride: int
    rows: int
    cols: int

    @property
    def step(self) -> float:
        """Level-0 pixels between neighbouring windows."""
        return self.stride * self.downsample

    @property
    def side(self) -> float:
        """Level-0 side of one window."""
        return self.patch * self.downsample

    def origins(self, rc: np.ndarray) -> np.ndarray:
        """Level-0 top-left corners ``(x, y)`` of windows ``rc`` (N, 2) = (row, col)."""
        rc = np.asarray(rc, np.int64).reshape(-1, 2)
        return np.stack([rc[:, 1] * self.step, rc[:, 0] * self.step], 1).astype(np.float64)

    def centres(self, rc: np.ndarray) -> np.ndarray:
        """Level-0 centres ``(x, y)`` of windows ``rc``."""
        return self.origins(rc) + self.side / 2

    def boxes(self, rc: np.ndarray) -> np.ndarray:
        """Level-0 boxes ``(x, y, w, h)`` of windows ``rc``."""
        o = self.origins(rc)
        return np.concatenate([o, np.full_like(o, self.side)], 1)

    def cell_of(self, xy: np.ndarray) -> np.ndarray:
        """(row, col) of the window whose centre is nearest each level-0 point, clipped."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        c = np.clip(np.round((xy[:, 0] - self.side / 2) / self.step), 0, max(self.cols - 1, 0))
        r = np.clip(np.round((xy[:, 1] - self.side / 2) / self.step), 0, max(self.rows - 1, 0))
        return np.stack([r, c], 1).astype(np.int64)

    def to_dict(self) -> dict:
        return asdict(self)


def window_grid(dims0: tuple[int, int], patch: int, downsample: float, stride: int) -> WindowGrid:
    """The grid of whole windows over a slide of level-0 size ``dims0 = (width, height)``.

    >>> g = window_grid((4096, 2048), 256, 1.0, 128)
    >>> g.rows, g.cols, g.step
    (15, 31, 128.0)
    """
    w = int(math.floor(dims0[0] / downsample + 1e-6))
    h = int(math.floor(dims0[1] / downsample + 1e-6))
    cols = (w - patch) // stride + 1 if w >= patch else 0
    rows = (h - patch) // stride + 1 if h >= patch else 0
    return WindowGrid(int(patch), float(downsample), int(stride), int(rows), int(cols))


def tissue_windows(grid: WindowGrid, mask: np.ndarray, mask_downsample, threshold: float,
                   box_side: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Windows with tissue fraction >= ``threshold`` (and > 0), row-major: ((N, 2) row/col,
    (N,) fraction).  Fractions follow the store's rule (``tissue.tile_tissue_fraction``),
    over the window itself or, with ``box_side``, a level-0 square of that side centred on
    it (the window's cell, ``grid.step``, for proposal-based detection)."""
    from hpcpath.tissue import tile_tissue_fraction

    side = grid.side if box_side is None else float(box_side)

    rows, cols = [], []
    fracs = []
    # One grid row at a time: memory stays one row of boxes whatever the slide size.
    c = np.arange(grid.cols)
    for r in range(grid.rows):
        rc = np.stack([np.full(grid.cols, r), c], 1)
        boxes = np.concatenate([grid.centres(rc) - side / 2, np.full((len(rc), 2), side)], 1)
        f = tile_tissue_fraction(mask, boxes, tuple(mask_downsample))
        keep = (f >= threshold) & (f > 0)
        rows.append(np.full(int(keep.sum()), r))
        cols.append(c[keep])
        fracs.append(f[keep])
    if not rows:
        return np.zeros((0, 2), np.int32), np.zeros(0, np.float32)
    rc = np.stack([np.concatenate(rows), np.concatenate(cols)], 1).astype(np.int32)
    return rc, np.concatenate(fracs).astype(np.float32)


def task_blocks(window_rows: np.ndarray, n_rows: int, chunk_rows: int, per_task: int
                ) -> list[tuple[int, int]]:
    """Split grid rows ``[0, n_rows)`` into tasks of whole chunk rows holding about
    ``per_task`` windows each; row ranges without windows get no task.

    >>> task_blocks(np.array([0, 0, 1, 5, 5, 5]), 8, 2, 3)
    [(0, 2), (4, 6)]
    """
    counts = np.bincount(np.asarray(window_rows, np.int64), minlength=n_rows)
    total = int(counts.sum())
    if total:  # even shares: ceil(total / per_task) tasks, not full ones and a small rest
        per_task = math.ceil(total / math.ceil(total / per_task))
    blocks: list[tuple[int, int]] = []
    start, end, acc = None, 0, 0
    for a in range(0, n_rows, chunk_rows):
        b = min(n_rows, a + chunk_rows)
        k = int(counts[a:b].sum())
        if k == 0:
            continue
        if start is None:
            start = a
        acc, end = acc + k, b
        if acc >= per_task:
            blocks.append((start, end))
            start, acc = None, 0
    if start is not None:
        blocks.append((start, end))
    return blocks

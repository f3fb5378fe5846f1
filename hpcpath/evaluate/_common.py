"""The input checks every evaluate module shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hpcpath.errors import MetricError

__all__ = ["MetricError", "as_points", "as_radius", "safe_ratio", "per_image"]


def as_points(a, ncols: int, name: str) -> np.ndarray:
    """``a`` as a finite float64 ``(N, ncols)`` array; an empty list gives ``(0, ncols)``."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, ncols))
    if arr.ndim != 2 or arr.shape[1] != ncols:
        cols = "x, y" if ncols == 2 else "x, y, score"
        raise MetricError(f"{name} must be an (N, {ncols}) array of {cols}; got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise MetricError(f"{name} contains NaN or inf; drop or fix those rows first")
    return arr


def as_radius(radius: float) -> float:
    """A finite, non-negative matching radius in pixels."""
    r = float(radius)
    if not np.isfinite(r) or r < 0:
        raise MetricError(f"radius must be a finite number of pixels >= 0, got {radius!r}")
    return r


def safe_ratio(num: float, den: float) -> float:
    """``num / den``, or 0.0 when ``den`` is 0 (an undefined precision/recall counts as 0)."""
    return float(num) / float(den) if den else 0.0


def per_image(value, n: int, name: str) -> list:
    """Broadcast one scalar to ``n`` images, or check a sequence has one value per image."""
    if isinstance(value, Sequence | np.ndarray) and not isinstance(value, str):
        values = list(value)
        if len(values) != n:
            raise MetricError(f"{name} has {len(values)} values for {n} images; give one per image")
        return values
    return [value] * n

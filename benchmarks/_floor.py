"""The floors' tissue test (shared by bench_cohort and bench_startup): the whole-image
mask at the configured resolution and the kept tiles, in the plainest form, for timing
what hpcpath's planner does against it."""

from __future__ import annotations

import math

import numpy as np


def floor_kept_tiles(slide, cfg) -> np.ndarray:
    """Index rows of the tiles an open ``slide`` keeps under ``cfg`` (a TileConfig)."""
    from hpcpath.tiling import tile_geometry, tile_grid
    from hpcpath.tissue import threshold_channel, tile_tissue_fraction, tissue_channel

    info = slide.info
    mds = max(1.0, cfg.mask_mpp / info.mpp[0])
    w0, h0 = info.dimensions
    mw, mh = math.ceil(w0 / mds), math.ceil(h0 / mds)
    mask, _ = threshold_channel(tissue_channel(slide.read_scaled(0, 0, mw, mh, mds), cfg.tissue_method),
                                method=cfg.tissue_method)
    index, boxes = tile_grid(tile_geometry(info, cfg))
    frac = tile_tissue_fraction(mask, boxes, (mds, mds))
    return index[(frac >= cfg.tissue_threshold) & (frac > 0)]

"""Stages composed for the applications (``hpcpath`` CLI, ``hpcpath serve``).

A stage works on what the stage before it wrote (inference takes slide stores); putting
stages one after another is this layer's job, so no stage imports another one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from hpcpath.config import InferConfig, TileConfig

__all__ = ["infer_inputs", "tile_for_model"]


def tile_for_model(slides: Sequence[Path], out_dir: str | os.PathLike, model_dir: str | os.PathLike,
                   *, client=None, tile_config: TileConfig | None = None,
                   on_event: Callable[[str, dict], None] | None = None
                   ) -> tuple[list[Path], list[tuple[str, str]]]:
    """Tile raw slides into ``out_dir/stores`` the way the model reads patches (its patch
    size, at its MPP when it has one; complete stores are reused).  Returns the stores
    made (an empty store too: 0 windows) and (slide id, one-line error) per failed slide."""
    from hpcpath.modelio import load_meta
    from hpcpath.tiling import tile_slides

    if not slides:
        return [], []
    mmeta = load_meta(model_dir)
    tcfg = tile_config or (TileConfig(tile_size=mmeta.patch_size, mpp=mmeta.patch_mpp)
                           if mmeta.patch_mpp else TileConfig(tile_size=mmeta.patch_size))
    if on_event:
        on_event("tiling", {"slides": len(slides)})
    out = Path(out_dir) / "stores"
    res = tile_slides(list(slides), out, tcfg, client=client)
    stores, failed = [], []
    for rec in res.records:
        if rec.status in ("complete", "empty"):  # no tissue: still a store, 0 windows
            stores.append(out / f"{rec.slide_id}.zarr")
        else:
            failed.append((rec.slide_id, f"{rec.source}: {rec.error}"))
    return stores, failed


def infer_inputs(inputs: Sequence[str | os.PathLike], model_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, cfg: InferConfig | None = None, *, client=None,
                 slide_dirs: Sequence[str | os.PathLike] = (), tile_config: TileConfig | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
    """``hpcpath infer``'s inputs (slides, stores, folders of either) -> predictions:
    slides are tiled first (:func:`tile_for_model`), then every store goes through
    :func:`hpcpath.infer.infer_slides`.  Returns its ``InferResult``."""
    from hpcpath.infer.run import check_model, infer_slides, split_inputs

    cfg = cfg or InferConfig()
    check_model(Path(model_dir), cfg)  # a bad model folder stops here, before any tiling
    stores, slides, bad = split_inputs(inputs)
    tiled, failed = tile_for_model(slides, out_dir, model_dir, client=client,
                                   tile_config=tile_config, on_event=on_event)
    return infer_slides([*stores, *tiled, *(p for p, _ in bad)], model_dir, out_dir, cfg,
                        client=client, slide_dirs=list(slide_dirs), failed=failed,
                        on_event=on_event)

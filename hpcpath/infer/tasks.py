"""Worker tasks of the inference graph.  Per slide::

    plan_predictions (worker; loads the model into that worker's cache): window grid, tissue
        windows, task row blocks; creates predictions/<name> (incomplete)
      -> predict_windows[k] or detect_candidates[k] (GPU workers; one per row block): read
         ahead on a thread, predict in fixed-size batches, write own heatmap chunks / own
         candidate list and a record of where it ran
      -> finish_predictions (worker): detections, CSV + GeoJSON, overlay PNG, slide summary,
         completion marker last

The driver receives only sizes and counts.  Every task's writes are its own and
deterministic, so Dask re-running a task after a lost worker rewrites the same bytes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath._malloc import keep_large_buffers
from hpcpath.config import InferConfig
from hpcpath.errors import ConfigError, HpcpathError, SlideError
from hpcpath.grid import WindowGrid, task_blocks, tissue_windows, window_grid
from hpcpath.store import PredictionsMeta, open_store
from hpcpath.store.predictions import (
    Predictions,
    create_group,
    open_predictions_group,
    predictions_meta,
    read_tasks,
    write_predictions_meta,
    write_task,
)

__all__ = ["plan_predictions", "plan_group", "pack_parts", "predict_parts", "predict_windows",
           "detect_candidates", "finish_predictions", "output_paths"]



def output_paths(out_dir: str, slide_id: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"overlay": out / f"{slide_id}.overlay.png",
            "csv": out / f"{slide_id}.detections.csv",
            "geojson": out / f"{slide_id}.detections.geojson"}


def _context_inputs(meta) -> dict[str, float]:
    """Model input name -> coarser factor, for multi-scale models ("context_<r>")."""
    out = {}
    for name in meta.inputs[1:]:
        try:
            out[name] = float(name.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            raise HpcpathError(f"model input {name!r} is not 'main' or 'context_<factor>'") from None
    return out


# ----------------------------------------------------------------------------- plan
def plan_predictions(store: str, slide_path: str | None, model_dir: str, name: str,
                     cfg: InferConfig, params_key: str, model_info: dict) -> dict[str, Any]:
    """Worker task: grid, windows, task blocks; creates the (incomplete) predictions group.
    User problems come back as ``{"error": ...}`` (no worker traceback for a bad input)."""
    try:
        return _plan(store, slide_path, model_dir, name, cfg, params_key, model_info)
    except HpcpathError as exc:
        return {"error": str(exc)}


def _plan(store, slide_path, model_dir, name, cfg, params_key, model_info):
    from hpcpath.infer.model import cached_model

    st = open_store(store)
    meta = st.metadata
    lm = cached_model(model_dir)
    mm = lm.meta
    if cfg.mode == "two-stage" and mm.task != "points":
        raise ConfigError(f"two-stage detection needs a points model; this one is {mm.task!r}",
                          model_dir)
    mpp = meta.mpp
    if mm.patch_mpp and not mpp:
        raise SlideError(f"slide has no MPP, but the model reads patches at {mm.patch_mpp} um/px",
                         meta.slide.source_name)
    d = float(mm.patch_mpp / mpp) if mm.patch_mpp else float(mm.patch_downsample or 1.0)
    til = meta.tiling
    p = int(mm.patch_size)
    stride = cfg.stride or max(1, int(round(til.stride * til.downsample / d)))
    thr = cfg.tissue_threshold
    if thr is None:  # windows as the store's tiles; proposals anywhere there is tissue
        thr = til.tissue_threshold if cfg.mode == "window" else 0.0
    context = _context_inputs(mm)
    dims0 = meta.slide.dimensions
    grid = window_grid(dims0, p, d, stride)
    source = "slide"
    if (cfg.mode == "window" and p == til.tile_size and abs(til.downsample - d) <= 1e-6 * d
            and stride == til.stride and not context and thr == til.tissue_threshold):
        source = "tiles"  # the windows are exactly the store's tiles: read them, not the slide
        windows = st.index[:, 3:5].astype(np.int32)
        if len(windows):
            grid = WindowGrid(p, d, stride, max(grid.rows, int(windows[:, 0].max()) + 1),
                              max(grid.cols, int(windows[:, 1].max()) + 1))
    else:
        mask_ds = st.mask_downsample
        cell = grid.step if cfg.mode == "two-stage" else None
        windows, _ = tissue_windows(grid, st.tissue_mask, mask_ds, thr, box_side=cell)
    if (source == "slide") and not (slide_path and Path(slide_path).exists()):
        raise SlideError(
            f"slide file {meta.slide.source_name!r} not found (needed to read windows at "
            "this stride or for two-stage detection); pass --slides DIR", store)
    classes = lm.classes
    if cfg.score_class is not None:
        if cfg.score_class not in classes:
            raise ConfigError(f"score_class {cfg.score_class!r} is not one of the model's classes "
                              f"({', '.join(classes)})", model_dir)
        score_channel = classes.index(cfg.score_class)
    else:
        score_channel = len(classes) - 1
    chunk_rows = int(np.clip(math.ceil(cfg.windows_per_task / max(grid.cols, 1)), 1, 256))
    blocks = task_blocks(windows[:, 0], grid.rows, chunk_rows, cfg.windows_per_task)
    mask = st.root["tissue/mask"]
    mds = st.mask_downsample
    tissue_mm2 = (float(np.count_nonzero(mask[:])) * mds[0] * mds[1] * mpp * mpp / 1e6) if mpp else None
    info = PredictionsMeta(
        name=name, mode=cfg.mode, source=source, params_key=params_key, grid=grid,
        model={**model_info, "task": mm.task, "patch_size": p, "patch_downsample": d},
        config=cfg.model_dump(mode="json"), classes=tuple(classes), score_channel=score_channel,
        label=classes[score_channel], context=context, n_windows=int(len(windows)),
        blocks=tuple(tuple(int(x) for x in b) for b in blocks), slide_id=meta.slide_id, mpp=mpp,
        tissue_mm2=tissue_mm2, tissue_threshold=thr,
    )
    heat_shape = (lm.n_outputs, grid.rows, grid.cols) if cfg.mode == "window" else None
    create_group(store, name, info, windows, heat_shape, chunk_rows)
    edges = np.searchsorted(windows[:, 0], [r for b in blocks for r in b]).reshape(-1, 2)
    return {"slide_id": info.slide_id, "store": store, "blocks": blocks,
            "block_windows": [int(b - a) for a, b in edges],
            "n_windows": int(len(windows)), "source": source}


def plan_group(items: list[tuple]) -> dict[str, Any]:
    """Worker task: :func:`plan_predictions` for each slide of a group (``items``: its
    argument tuples), one task and one scheduler round trip for many small slides.  Returns
    ``{"slides": [plan, ...]}`` in ``items`` order; a slide's problem is its own entry's
    ``{"error": ...}`` (any exception, as one line), never the group's."""
    from hpcpath.stage import one_line

    out = []
    for args in items:
        try:
            out.append(plan_predictions(*args))
        except Exception as exc:  # noqa: BLE001 - fails this slide only
            out.append({"error": one_line(exc)})
    return {"slides": out}


def pack_parts(sizes: list[int], budget: int, max_items: int | None = None) -> list[list[int]]:
    """Consecutive parts (blocks of one or several slides, ``sizes`` windows each) packed into
    units of at most ``budget`` windows and ``max_items`` parts (a bigger part is a unit of
    its own).

    >>> pack_parts([686, 686, 9000, 100, 50], 8192)
    [[0, 1], [2], [3, 4]]
    >>> pack_parts([1, 1, 1], 8192, max_items=2)
    [[0, 1], [2]]
    """
    units: list[list[int]] = []
    acc = 0
    for i, n in enumerate(sizes):
        if units and acc + n <= budget and (max_items is None or len(units[-1]) < max_items):
            units[-1].append(i)
            acc += n
        else:
            units.append([i])
            acc = n
    return units


# ----------------------------------------------------------------------------- region tasks
def _open(store: str, name: str) -> tuple[Any, PredictionsMeta]:
    g = open_predictions_group(store, name, "r+")
    return g, predictions_meta(g)


def _rows(windows: np.ndarray, r0: int, r1: int) -> tuple[int, int]:
    a, b = np.searchsorted(windows[:, 0], [r0, r1])
    return int(a), int(b)


def _record(k, r0, r1, n, t0, predict_s, wait_s, **extra) -> dict[str, Any]:
    from hpcpath.infer.model import device_record

    rec = device_record()
    rec["started"] = round(rec["ended"] - (time.perf_counter() - t0), 3)
    return {"task": k, "rows": [r0, r1], "windows": n, **rec,
            "seconds": round(time.perf_counter() - t0, 4), "predict_s": round(predict_s, 4),
            "io_wait_s": round(wait_s, 4), **extra}


def _loaded(model_dir: str, info: PredictionsMeta):
    from hpcpath.infer.model import cached_model

    lm = cached_model(model_dir)
    if len(info.classes) != lm.n_outputs:
        raise HpcpathError(f"model now has {lm.n_outputs} outputs, planned for "
                           f"{len(info.classes)}; rerun", model_dir)
    return lm


def _task_context(store: str, name: str, model_dir: str, r0: int, r1: int):
    """What every prediction task starts from: the predictions group and its attributes, the
    window grid, the windows of grid rows [r0, r1) (as the slice a:b) and the cached model."""
    keep_large_buffers()
    g, info = _open(store, name)
    grid = info.grid
    windows = g["windows"][:]
    a, b = _rows(windows, r0, r1)
    return g, info, grid, windows, a, b, _loaded(model_dir, info)


def predict_windows(store: str, slide_path: str | None, model_dir: str, name: str, k: int,
                    r0: int, r1: int, cfg: InferConfig) -> int:
    """Worker task: every window in grid rows [r0, r1) of one slide (:func:`predict_parts`
    with one part).  Returns the number of windows."""
    return predict_parts(((store, slide_path, k, r0, r1),), model_dir, name, cfg)


def _part_pieces(i: int, store: str, slide_path: str | None, info: PredictionsMeta,
                 windows: np.ndarray, a: int, b: int):
    """Part ``i``'s windows ``a:b`` as reader pieces whose keys are ``(i, window index)``."""
    from hpcpath.infer.reader import slide_pieces, tile_pieces

    if info.source == "tiles":
        pieces = tile_pieces(open_store(store).tiles, a, b)
    else:
        from hpcpath.io import open_slide

        assert slide_path is not None, "planned to read the slide, so its path was found"
        grid = info.grid
        pieces = ((idx + a, arrays) for idx, arrays in
                  slide_pieces(open_slide(slide_path, cached=True), grid.centres(windows[a:b]),
                               grid.downsample, grid.patch, info.context))
    for idx, arrays in pieces:
        yield np.stack([np.full(len(idx), i, np.int64), np.asarray(idx, np.int64)], 1), arrays


def predict_parts(parts: tuple[tuple, ...], model_dir: str, name: str, cfg: InferConfig) -> int:
    """Worker task: the windows of one or more *parts* -- ``(store, slide_path, k, r0, r1)``,
    grid rows [r0, r1) of a slide, its task ``k`` -- read one after another into the same
    fixed-size batches, so many small slides fill whole batches in one task.  Each part's
    heatmap rows (whole chunks, planned as that slide's block ``k``) and record are written
    to its own slide only; a rerun rewrites the same bytes.  Returns the number of windows."""
    from hpcpath.infer.reader import Prefetcher, rebatch

    t0 = time.perf_counter()
    ctx = [_task_context(store, name, model_dir, r0, r1) for store, _, _, r0, r1 in parts]
    lm = ctx[0][-1]
    batch = cfg.batch_size

    def make():
        return rebatch((piece for i, ((store, src, *_), (g, info, grid, windows, a, b, _)) in
                        enumerate(zip(parts, ctx))
                        for piece in _part_pieces(i, store, src, info, windows, a, b)), batch)

    outs = [np.full((lm.n_outputs, r1 - r0, c[2].cols), np.nan, np.float32)
            for (_, _, _, r0, r1), c in zip(parts, ctx)]
    predict_s = 0.0
    with Prefetcher(make, cfg.prefetch) as pf:
        for keys, arrays in pf:
            t = time.perf_counter()
            scores = lm.predict(arrays, batch, cfg.tta, xla=cfg.xla, mixed=cfg.mixed_precision)
            predict_s += time.perf_counter() - t
            # keys are sorted by part (parts are read in order): split the batch at part edges
            cuts = np.flatnonzero(np.diff(keys[:, 0])) + 1
            for ks, sc in zip(np.split(keys, cuts), np.split(scores, cuts)):
                i = int(ks[0, 0])
                w = ctx[i][3][ks[:, 1]]
                outs[i][:, w[:, 0] - parts[i][3], w[:, 1]] = sc.T
        wait = pf.wait_s
    total = sum(c[5] - c[4] for c in ctx) or 1
    for (_, _, k, r0, r1), (g, *_, a, b, _), out in zip(parts, ctx, outs):
        g["heatmap"][:, r0:r1, :] = out
        share = (b - a) / total  # a shared task's time, split by windows
        rec = _record(k, r0, r1, b - a, t0, predict_s * share, wait * share)
        rec["seconds"] = round(rec["seconds"] * share, 4)
        write_task(g, k, rec)
    return sum(c[5] - c[4] for c in ctx)


def detect_candidates(store: str, slide_path: str, model_dir: str, name: str, k: int,
                      r0: int, r1: int, cfg: InferConfig) -> int:
    """Worker task (two-stage): nucleus proposals in the cells of grid rows [r0, r1), each
    classified on a patch centred on it.  Writes its candidates (x, y, score) and record."""
    from hpcpath.detect import propose_nuclei
    from hpcpath.infer.reader import Prefetcher, cut_patches, point_blocks, read_around, rebatch
    from hpcpath.io import open_slide

    t0 = time.perf_counter()
    g, info, grid, windows, a, b, lm = _task_context(store, name, model_dir, r0, r1)
    sel = windows[a:b].astype(np.int64)
    slide = open_slide(slide_path, cached=True)
    d, p, s = grid.downsample, grid.patch, grid.stride
    centres = grid.centres(sel) / d  # patch pixels
    span = max(s, 2048 - p)
    blocks = list(point_blocks(centres, span))
    owner = np.full((max(r1 - r0, 1), max(grid.cols, 1)), -1, np.int32)
    for bi, idx in enumerate(blocks):
        owner[sel[idx, 0] - r0, sel[idx, 1]] = bi
    px_um = 1.0 / ((info.mpp or 0.25) * d)  # patch pixels per micron
    sigma = cfg.proposal_sigma_um * px_um
    min_dist = cfg.proposal_min_distance_um * px_um
    halo = int(math.ceil(p / 2 + 4 * sigma + 2))
    n_prop = 0

    def make():
        nonlocal n_prop
        for bi, idx in enumerate(blocks):
            c = centres[idx]
            lo = np.floor(c.min(0) - s / 2 - halo).astype(np.int64)
            hi = np.ceil(c.max(0) + s / 2 + halo).astype(np.int64)
            img = slide.read_scaled(float(lo[0] * d), float(lo[1] * d), int(hi[0] - lo[0]),
                                    int(hi[1] - lo[1]), d)
            rc, _ = propose_nuclei(img, sigma, cfg.proposal_threshold, min_dist)
            n_prop += len(rc)
            xy = (lo[None, :] + rc[:, ::-1] + 0.5) * d  # level-0 pixel centres
            cell = grid.cell_of(xy)
            near = (np.abs(grid.centres(cell) - xy) <= grid.step / 2 + 1e-9).all(1)
            inrows = near & (cell[:, 0] >= r0) & (cell[:, 0] < r1)
            mine = np.zeros(len(xy), bool)
            mine[inrows] = owner[cell[inrows, 0] - r0, cell[inrows, 1]] == bi
            xy = xy[mine]
            tl = np.round(xy / d - lo[None, :] - p / 2).astype(np.int64)
            arrays = {"main": cut_patches(img, tl[:, ::-1], p)}
            for cname, f in info.context.items():
                cimg, coff, _ = read_around(slide, xy, d * f, p)
                arrays[cname] = cut_patches(cimg, coff, p)
            yield xy, arrays

    found, predict_s = [], 0.0
    with Prefetcher(lambda: rebatch(make(), cfg.batch_size), cfg.prefetch) as pf:
        for xy, arrays in pf:
            t = time.perf_counter()
            scores = lm.predict(arrays, cfg.batch_size, cfg.tta, xla=cfg.xla, mixed=cfg.mixed_precision)
            predict_s += time.perf_counter() - t
            found.append(np.concatenate([xy, scores[:, info.score_channel, None]], 1))
        wait = pf.wait_s
    pts = np.concatenate(found) if found else np.zeros((0, 3))
    write_task(g, k, _record(k, r0, r1, b - a, t0, predict_s, wait, candidates=len(pts),
                             proposals=n_prop), points=pts)
    return len(pts)


# ----------------------------------------------------------------------------- finish
def _heatmap_hits(heat, ch: int, grid: WindowGrid, cfg: InferConfig) -> tuple[np.ndarray, np.ndarray]:
    """Detections from the heatmap, a band of rows at a time (bounded memory): NMS peaks or
    DBSCAN clusters of smoothed windows >= threshold, in level-0 pixels."""
    from hpcpath.detect import heatmap_peaks, merge_points, smooth_valid

    radius_cells = cfg.radius_px / grid.step
    halo = int(math.ceil(radius_cells + 4 * cfg.smooth_sigma)) + 2
    band = 512
    xs, ss = [], []
    rows = heat.shape[1]
    for a in range(0, rows, band):
        lo, hi = max(0, a - halo), min(rows, a + band + halo)
        v = heat[ch, lo:hi, :]
        if cfg.merge == "nms":
            pos, sc = heatmap_peaks(v, cfg.threshold, radius_cells, cfg.smooth_sigma)
        else:
            sm = smooth_valid(v, cfg.smooth_sigma)
            r, c = np.nonzero(np.nan_to_num(sm, nan=-1.0) >= cfg.threshold)
            pos, sc = np.stack([r, c], 1).astype(np.float64), sm[r, c]
        own = (np.rint(pos[:, 0]) + lo >= a) & (np.rint(pos[:, 0]) + lo < a + band)
        pos, sc = pos[own], sc[own]
        xs.append(np.stack([pos[:, 1] * grid.step + grid.side / 2,
                            (pos[:, 0] + lo) * grid.step + grid.side / 2], 1))
        ss.append(sc)
    xy = np.concatenate(xs) if xs else np.zeros((0, 2))
    sc = np.concatenate(ss) if ss else np.zeros(0)
    return merge_points(xy, sc, cfg.radius_px, cfg.merge)


def _thumbnail(st, dims0) -> tuple[np.ndarray, float]:
    """RGB thumbnail from the store's pyramid (longer side <= 1024 where a level allows) and
    its level-0 pixels per thumbnail pixel; the tissue mask in grey without a pyramid."""
    levels = st.pyramid
    if levels:
        pick = next((a for a in levels if max(a.shape[1:]) <= 1024), levels[-1])
        thumb = np.moveaxis(pick[:], 0, -1)
    else:
        m = st.root["tissue/mask"][:]
        thumb = np.where(m[..., None] > 0, 200, 245).astype(np.uint8).repeat(3, -1)
    return np.ascontiguousarray(thumb), dims0[0] / thumb.shape[1]


def _heat_on_thumb(heat, ch: int, grid: WindowGrid, shape, f: float) -> np.ndarray:
    """The score grid resampled to thumbnail pixels (nearest window centre; NaN where no
    window covers the pixel's centre cell)."""
    h, w = shape
    def axis(n, count):
        centre0 = (np.arange(n) + 0.5) * f
        idx = np.round((centre0 - grid.side / 2) / grid.step).astype(np.int64)
        ok = (idx >= 0) & (idx < count) & (np.abs(idx * grid.step + grid.side / 2 - centre0)
                                           <= grid.step / 2 + 1e-9)
        return np.clip(idx, 0, max(count - 1, 0)), ok
    ri, rok = axis(h, grid.rows)
    ci, cok = axis(w, grid.cols)
    out = np.full((h, w), np.nan, np.float32)
    if grid.rows == 0 or grid.cols == 0:
        return out
    urows = np.unique(ri[rok])
    if len(urows) == 0:
        return out
    vals = heat.oindex[ch, urows, :]  # only the grid rows the thumbnail shows
    pos = np.searchsorted(urows, ri)
    sub = vals[np.clip(pos, 0, len(urows) - 1)][:, ci]
    return np.where(rok[:, None] & cok[None, :], sub, np.nan).astype(np.float32)


def finish_predictions(store: str, name: str, out_dir: str, cfg: InferConfig, *done: int) -> int:
    """Worker task, after every region task: detections (points models), their CSV and
    GeoJSON, the overlay PNG, the slide summary, then the completion marker.  Returns the
    number of detections."""
    from hpcpath.detect import merge_points
    from hpcpath.infer.outputs import detections_csv, detections_geojson, overlay_png
    from hpcpath.ngff import class_colors, write_heatmap_layers
    from hpcpath.store import open_group

    st = open_store(store)
    g, info = _open(store, name)
    recs = read_tasks(g)
    planned = len(info.blocks)
    if len(recs) != planned or sum(r["windows"] for r, _ in recs) != info.n_windows:
        raise HpcpathError(f"{len(recs)} of {planned} prediction tasks recorded; not marking "
                           "complete (rerun)", store)
    grid = info.grid
    preds = Predictions(Path(store), name, g)
    ch = info.score_channel
    label = info.label
    summary: dict[str, Any] = {"windows": info.n_windows, "tasks": planned}
    if info.mode == "window":
        scores = preds.window_scores(ch).astype(np.float64)
        if len(scores):
            k = min(cfg.top_k, len(scores))
            summary.update(max_prob=float(scores.max()), mean_prob=float(scores.mean()),
                           topk_mean=float(np.sort(scores)[-k:].mean()),
                           positive_fraction=float((scores >= cfg.threshold).mean()))
    xy = None
    if info.task == "points":
        if info.mode == "window":
            xy, sc = _heatmap_hits(g["heatmap"], ch, grid, cfg)
        else:
            pts = np.concatenate([p for _, p in recs if p is not None and len(p)] or [np.zeros((0, 3))])
            pts = pts[pts[:, 2] >= cfg.threshold]
            xy, sc = merge_points(pts[:, :2], pts[:, 2], cfg.radius_px, cfg.merge)
            cands = sum(r.get("candidates", 0) for r, _ in recs)
            summary["candidates"] = int(cands)
        det = np.concatenate([xy, sc[:, None]], 1) if len(xy) else np.zeros((0, 3))
        if "detections" in g:
            del g["detections"]
        g.create_array("detections", data=det, chunks=(max(1, len(det)), 3),
                       attributes={"columns": ["x", "y", "score"], "class": label})
        paths = output_paths(out_dir, info.slide_id)
        detections_csv(paths["csv"], xy, sc, label)
        detections_geojson(paths["geojson"], xy, sc, label, info.slide_id,
                           class_colors(info.classes)[ch])  # napari's labels colour too
        area = info.tissue_mm2
        summary["detections"] = int(len(xy))
        summary["detections_per_mm2"] = (len(xy) / area) if area else None
        if info.mpp:  # TUPAC16: mitoses in the densest 10 HPF (2 mm^2), score 1-3
            from hpcpath.evaluate.proliferation import mitoses_per_10hpf, proliferation_score

            summary["hpf10_max"] = mitoses_per_10hpf(xy, info.mpp)
            summary["proliferation_score"] = proliferation_score(summary["hpf10_max"])
    if info.mode == "window":  # the heatmap as OME-NGFF image + labels, for viewers
        write_heatmap_layers(open_group(store, "r+"), g, name, info.classes, step=grid.step,
                             side=grid.side, mpp=st.metadata.slide.mpp, threshold=cfg.threshold)
    thumb, f = _thumbnail(st, st.metadata.slide.dimensions)
    heat = (_heat_on_thumb(g["heatmap"], ch, grid, thumb.shape[:2], f)
            if info.mode == "window" else None)
    overlay_png(output_paths(out_dir, info.slide_id)["overlay"], thumb, heat,
                None if xy is None else xy / f)
    tasks = [r for r, _ in recs]
    secs = sum(r["seconds"] for r in tasks)
    summary.update(
        devices=";".join(sorted({r["cuda_visible_devices"] for r in tasks})),
        io_wait_fraction=(sum(r["io_wait_s"] for r in tasks) / secs) if secs else 0.0,
        tissue_mm2=info.tissue_mm2, mpp=info.mpp, task_records=tasks,
    )
    write_predictions_meta(g, info.replace(summary=summary, complete=True))  # the marker, last
    return int(summary.get("detections", 0))

"""Scoring what ``hpcpath infer`` wrote against ground-truth files.

The metric functions of this package are pure; this module finds their inputs: detection
files and point truths matched by slide id, the heatmap windows of a store labelled from
truth masks or polygons, lesion masks for the FROC, and the slide table for slide-level
scoring.  Every problem with an input is one line naming the file (``HpcpathError``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.errors import HpcpathError

__all__ = [
    "DetectionSet",
    "load_detection_sets",
    "score_detections",
    "score_proliferation",
    "HeatmapSet",
    "load_heatmap_set",
    "truth_raster",
    "window_labels",
    "score_heatmaps",
]

_DET_SUFFIXES = (".detections.csv", ".detections.geojson")
_TRUTH_SUFFIXES = {".csv", ".json", ".geojson", ".xml", ".tif", ".tiff"}


def _expand(paths: Sequence[str | os.PathLike], keep) -> list[Path]:
    """Files named, files in folders (those ``keep`` accepts), and glob patterns
    (``'truth/*.mitoses.csv'``, quoted so the shell leaves it to us)."""
    import glob

    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists() and glob.has_magic(str(raw)):
            hits = sorted(Path(h) for h in glob.glob(str(raw)) if Path(h).is_file())
            if not hits:
                raise HpcpathError("no file matches this pattern", raw)
            out += hits
        elif p.is_dir():
            out += sorted(c for c in p.iterdir() if c.is_file() and keep(c))
        elif p.exists():
            out.append(p)
        else:
            raise HpcpathError("no such file or folder", p)
    return out


def _slide_of_detections(p: Path) -> str:
    for s in _DET_SUFFIXES:
        if p.name.endswith(s):
            return p.name[: -len(s)]
    return p.stem


def _run_mpp(folder: Path) -> dict[str, float]:
    """slide_id -> MPP from an infer run table (``summary.csv``) in ``folder``, if any."""
    from hpcpath.files import read_table

    out = {}
    for row in read_table(folder / "summary.csv"):
        try:
            out[row["slide_id"]] = float(row["mpp"])
        except (KeyError, TypeError, ValueError):
            pass
    return out


def _points(path: Path, classes: Sequence[str] | None, with_score: bool) -> np.ndarray:
    """(N, 2) or (N, 3) points of a CSV / GeoJSON / XML file (scores: 1 where absent)."""
    import csv

    from hpcpath.annotations import read_annotations

    if with_score and path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and "score" in [c.strip().lower() for c in rows[0]]:
            head = [c.strip().lower() for c in rows[0]]
            ix, iy, isc = head.index("x"), head.index("y"), head.index("score")
            icl = head.index("class") if "class" in head else None
            try:
                pts = [(float(r[ix]), float(r[iy]), float(r[isc])) for r in rows[1:]
                       if r and (classes is None or icl is None or r[icl] in classes)]
            except (ValueError, IndexError):
                raise HpcpathError("malformed detection row (expected x,y,score numbers)", path) from None
            return np.array(pts, np.float64).reshape(-1, 3)
    ann = read_annotations(path)
    points = [p for p in ann.points if classes is None or p.label in classes]
    scores = []
    if with_score and path.suffix.lower() in (".json", ".geojson"):
        scores = _geojson_scores(path, classes)
    xy = np.array([[p.x, p.y] for p in points], np.float64).reshape(-1, 2)
    if not with_score:
        return xy
    sc = np.asarray(scores, np.float64) if len(scores) == len(xy) else np.ones(len(xy))
    return np.concatenate([xy, sc[:, None]], 1)


def _geojson_scores(path: Path, classes) -> list[float]:
    import json

    doc = json.loads(path.read_text(encoding="utf-8"))
    feats = doc.get("features", []) if isinstance(doc, dict) else doc
    out = []
    for f in feats:
        g = (f or {}).get("geometry") or {}
        if g.get("type") != "Point":
            continue
        props = f.get("properties") or {}
        name = (props.get("classification") or {}).get("name")
        if classes is not None and name not in classes:
            continue
        m = props.get("measurements") or {}
        out.append(float(m.get("score", 1.0)) if isinstance(m, dict) else 1.0)
    return out


@dataclass
class DetectionSet:
    """Per slide: scored detections (N, 3), truth points (M, 2), matching radius (px)."""

    slide_ids: list[str]
    preds: list[np.ndarray]
    truths: list[np.ndarray]
    radii: list[float]
    mpps: list[float]
    files: list[tuple[Path, Path]] = field(default_factory=list)


def load_detection_sets(pred_paths, truth_paths, *, mpp: float | None = None,
                        radius_px: float = 30.0, ref_mpp: float = 0.25,
                        classes: Sequence[str] | None = None) -> DetectionSet:
    """Pair detection files (``<slide_id>.detections.csv``/``.geojson``, or folders of them)
    with truth point files by slide id; the radius is ``radius_px`` at ``ref_mpp`` scaled to
    each slide's MPP (from the run's ``summary.csv`` next to the detections, else ``mpp``)."""
    from hpcpath.annotations import match_annotations
    from hpcpath.evaluate.detection import radius_for_mpp

    dets = _expand(pred_paths, lambda c: c.name.endswith(_DET_SUFFIXES))
    if not dets:
        raise HpcpathError("no detection files (*.detections.csv or *.detections.geojson)",
                           ", ".join(map(str, pred_paths)))
    by_id: dict[str, Path] = {}
    for d in dets:
        sid = _slide_of_detections(d)
        if sid in by_id and by_id[sid].suffix == ".csv":
            continue  # CSV and GeoJSON of one run: the CSV
        by_id[sid] = d
    truths = _expand(truth_paths, lambda c: c.suffix.lower() in _TRUTH_SUFFIXES and c.name != "summary.csv")
    matched = match_annotations(list(by_id), truths)
    missing = [s for s, fs in matched.items() if not fs]
    if missing:
        raise HpcpathError(f"no truth file for slide {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                           by_id[missing[0]])
    out = DetectionSet([], [], [], [], [])
    for sid in sorted(by_id):
        d = by_id[sid]
        m = _run_mpp(d.parent).get(sid, mpp)
        if m is None:
            raise HpcpathError(f"MPP of slide {sid!r} unknown (no summary.csv row); pass --mpp", d)
        t = np.concatenate([_points(f, classes, False) for f in matched[sid]]).reshape(-1, 2)
        out.slide_ids.append(sid)
        out.preds.append(_points(d, None, True))
        out.truths.append(t)
        out.mpps.append(float(m))
        out.radii.append(radius_for_mpp(float(m), radius_px, ref_mpp))
        out.files.append((d, matched[sid][0]))
    return out


def score_detections(ds: DetectionSet, threshold: float | None = None,
                     matching: str = "one-to-one") -> dict[str, Any]:
    """Global F1 / precision / recall (all detections, or those ``>= threshold``) under the
    ``matching`` rule (``one-to-one`` or ``any``), the best threshold, and per-slide counts."""
    from hpcpath.evaluate.detection import DetectionScores, best_threshold, match_detections

    preds = [p if threshold is None else p[p[:, 2] >= threshold] for p in ds.preds]
    per, tp, fp, fn = [], 0, 0, 0
    for sid, p, t, r, m in zip(ds.slide_ids, preds, ds.truths, ds.radii, ds.mpps):
        mt = match_detections(p[:, :2], t, r, matching)
        tp, fp, fn = tp + mt.tp, fp + mt.fp, fn + mt.fn
        per.append({"slide_id": sid, "tp": mt.tp, "fp": mt.fp, "fn": mt.fn, "radius_px": r, "mpp": m})
    sc = DetectionScores.from_counts(tp, fp, fn)
    out: dict[str, Any] = {"matching": matching, "f1": sc.f1, "precision": sc.precision,
                           "recall": sc.recall, "tp": tp, "fp": fp, "fn": fn,
                           "threshold": threshold, "slides": per, "best": None}
    if sum(len(p) for p in preds):
        best = best_threshold(preds, ds.truths, ds.radii, matching)
        out["best"] = {"threshold": best.threshold, "f1": best.f1, "precision": best.precision,
                       "recall": best.recall}
        out["_best"] = best
    return out


def score_proliferation(ds: DetectionSet, threshold: float | None = None,
                        labels: str | os.PathLike | None = None, cuts=None) -> dict[str, Any]:
    """Per slide, mitoses in the densest 10 HPF and the 1-3 score
    (:mod:`hpcpath.evaluate.proliferation`) from the detections ``>= threshold``; with a
    label table (slide id -> score), quadratic-weighted kappa and Spearman."""
    from hpcpath.evaluate.proliferation import PROLIFERATION_CUTS, agreement, mitoses_per_10hpf, proliferation_score

    cuts = tuple(cuts or PROLIFERATION_CUTS)
    rows, counts = [], {}
    for sid, p, m in zip(ds.slide_ids, ds.preds, ds.mpps):
        p = p if threshold is None else p[p[:, 2] >= threshold]
        n = mitoses_per_10hpf(p[:, :2], m)
        counts[sid] = n
        rows.append({"slide_id": sid, "detections": int(len(p)), "mitoses_per_10hpf": n,
                     "proliferation_score": proliferation_score(n, cuts)})
    out: dict[str, Any] = {"cuts": list(cuts), "rows": rows}
    if labels is not None:
        from hpcpath.annotations import read_label_table

        table = read_label_table(labels)
        for r in rows:
            r["label"] = table.get(r["slide_id"])
        out["agreement"] = agreement(counts, table, cuts)
    return out


# ----------------------------------------------------------------------------- heatmaps
def truth_raster(files: Sequence[Path], dims0: tuple[int, int], downsample: float,
                 classes: Sequence[str] | None, *, origin: tuple[float, float] = (0.0, 0.0),
                 shape: tuple[int, int] | None = None) -> np.ndarray:
    """bool (h, w) raster at ``downsample`` of the truth regions (mask TIFFs: > 0;
    polygons of ``classes``, or of every class when None); the whole slide unless
    ``origin`` (level 0) and ``shape`` say which window."""
    from hpcpath.annotations import MaskAnnotation, read_annotations

    if shape is None:
        shape = (max(1, math.ceil(dims0[1] / downsample)), max(1, math.ceil(dims0[0] / downsample)))
    h, w = shape
    out = np.zeros((h, w), bool)
    for f in files:
        if Path(f).suffix.lower() in (".tif", ".tiff"):
            with MaskAnnotation(f, (int(dims0[0]), int(dims0[1]))) as m:
                out |= m.read_region(origin[0], origin[1], w, h, downsample) > 0
        else:
            a = read_annotations(f).clip(*dims0)
            if classes is not None:
                a = a.filter(classes)
            if a.regions:
                out |= a.rasterize((h, w), origin=origin, downsample=downsample) > 0
    return out


def window_labels(dims0: tuple[int, int], boxes: np.ndarray, files: Sequence[Path],
                  classes: Sequence[str] | None, centre_fraction: float = 50 / 80,
                  block: int = 2048) -> np.ndarray:
    """(N,) bool per level-0 box ``(x, y, w, h)``: truth in its central square (the rule
    training labels use, ``hpcpath.labels.centre_labels``).  The truth is rasterised at
    downsample 4 (as ``DatasetConfig.label_downsample``; finer for tiny windows), block by
    block: memory stays one block."""
    from hpcpath.labels import centre_labels

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    out = np.zeros(len(boxes), bool)
    if not len(boxes) or not files:
        return out
    ds = max(1.0, min(4.0, float(boxes[:, 2].min()) * centre_fraction / 4))
    step = block * ds
    key = (boxes[:, 1] // step).astype(np.int64) * (1 << 20) + (boxes[:, 0] // step).astype(np.int64)
    for k in np.unique(key):
        sel = np.flatnonzero(key == k)
        x0 = math.floor(boxes[sel, 0].min() / ds) * ds
        y0 = math.floor(boxes[sel, 1].min() / ds) * ds
        w = int(math.ceil(((boxes[sel, 0] + boxes[sel, 2]).max() - x0) / ds))
        h = int(math.ceil(((boxes[sel, 1] + boxes[sel, 3]).max() - y0) / ds))
        raster = truth_raster(files, dims0, ds, classes, origin=(x0, y0), shape=(h, w))
        out[sel] = centre_labels(raster, ds, boxes[sel], centre_fraction=centre_fraction,
                                 origin=(x0, y0))
    return out


@dataclass
class HeatmapSet:
    """Per slide: window scores and labels, slide label and score, FROC inputs."""

    slide_ids: list[str]
    scores: list[np.ndarray]
    labels: list[np.ndarray]
    windows: list[np.ndarray]
    slide_labels: list[bool]
    slide_scores: list[float]
    lesion_detections: list[np.ndarray]
    lesion_masks: list[np.ndarray]
    lesion_ignore: list[list[int]]
    lesion_downsamples: list[float]


def load_heatmap_set(stores, truth_paths, name: str, *, classes: Sequence[str] = ("Tumor",),
                     centre_fraction: float = 50 / 80, slide_score: str = "max_prob",
                     lesion_mpp: float = 8.0, peak_radius_um: float = 75.0) -> HeatmapSet:
    """Windows of ``predictions/<name>`` in each store, labelled by the centre rule from the
    truth files matched to the slide (no truth file: a tumour-free slide)."""
    from hpcpath.annotations import match_annotations
    from hpcpath.detect import heatmap_peaks, merge_points
    from hpcpath.evaluate.froc import itc_labels, lesion_labels
    from hpcpath.files import find_stores
    from hpcpath.store import open_predictions, open_store

    paths = find_stores(list(stores))
    if not paths:
        raise HpcpathError("no slide stores (.zarr)", ", ".join(map(str, stores)))
    metas = {p: open_store(p).metadata for p in paths}
    ids = {m.slide_id: p for p, m in metas.items()}
    truths = _expand(truth_paths, lambda c: c.suffix.lower() in _TRUTH_SUFFIXES)
    matched = match_annotations(list(ids), truths)
    hs = HeatmapSet([], [], [], [], [], [], [], [], [], [])
    for sid in sorted(ids):
        st = ids[sid]
        pr = open_predictions(st, name)
        if pr.heatmap is None:
            raise HpcpathError(f"predictions/{name} have no heatmap (two-stage run)", st)
        grid, rc = pr.grid, pr.windows
        scores = pr.window_scores().astype(np.float64)
        meta = metas[st]
        dims0 = meta.slide.dimensions
        files = matched[sid]
        labels = window_labels(dims0, grid.boxes(rc), files, classes, centre_fraction)
        mpp = meta.mpp
        ds = max(1.0, lesion_mpp / mpp) if mpp else 16.0
        raster = truth_raster(matched[sid], dims0, ds, classes) if files else np.zeros((1, 1), bool)
        mask_mpp = (mpp or 1.0) * ds
        lesions = lesion_labels(raster, mask_mpp)
        heat = pr.heatmap[pr.score_channel, :, :]
        pos, sc = heatmap_peaks(heat, 0.0, max(1.0, peak_radius_um / ((mpp or 1.0) * grid.step)), 0.0)
        xy = np.stack([pos[:, 1] * grid.step + grid.side / 2, pos[:, 0] * grid.step + grid.side / 2], 1)
        xy, sc = merge_points(xy, sc, peak_radius_um / (mpp or 1.0))
        hs.slide_ids.append(sid)
        hs.scores.append(scores)
        hs.labels.append(labels.astype(bool))
        hs.windows.append(rc)
        hs.slide_labels.append(bool(raster.any()))
        hs.slide_scores.append(float(pr.summary.get(slide_score, scores.max() if len(scores) else 0.0)))
        hs.lesion_detections.append(np.concatenate([xy, sc[:, None]], 1))
        hs.lesion_masks.append(lesions)
        hs.lesion_ignore.append(itc_labels(lesions, mask_mpp))
        hs.lesion_downsamples.append(ds)
    return hs


def score_heatmaps(hs: HeatmapSet) -> dict[str, Any]:
    """Tile AUC (pooled windows), slide AUC, FROC; a metric that cannot be computed (one
    class only, no lesion) is None with the reason."""
    from hpcpath.evaluate._common import MetricError
    from hpcpath.evaluate.froc import froc
    from hpcpath.evaluate.roc import roc_auc

    y = np.concatenate(hs.labels) if hs.labels else np.zeros(0, bool)
    s = np.concatenate(hs.scores) if hs.scores else np.zeros(0)
    out: dict[str, Any] = {"windows": int(len(y)), "positive_windows": int(y.sum()),
                           "slides": len(hs.slide_ids)}
    for key, fn in (("tile_auc", lambda: roc_auc(y, s)),
                    ("slide_auc", lambda: roc_auc(np.array(hs.slide_labels), np.array(hs.slide_scores)))):
        try:
            out[key] = fn()
        except MetricError as exc:
            out[key], out[f"{key}_why"] = None, exc.message
    try:
        res = froc(hs.lesion_detections, hs.lesion_masks, hs.lesion_downsamples, hs.lesion_ignore)
        out["froc"] = {"score": res.score, "sensitivity": dict(zip(map(str, res.fp_rates),
                                                                    res.sensitivity.tolist())),
                       "lesions": res.n_lesions}
        out["_froc"] = res
    except MetricError as exc:
        out["froc"], out["froc_why"] = None, exc.message
    return out

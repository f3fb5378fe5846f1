"""Slide stores + annotations -> labelled patch datasets, on a cluster (Dask or Spark).

Per slide (worker tasks; the driver sees counts only):

    label_slide:  annotations for this slide -> labels (and fractions) for every tile of the
                  store (centre / fraction rules), or point-centred positive and distant
                  negative patches (points rule); creates ``datasets/<name>/`` in the store
      -> write_patches[a:b]: patch pixels (points rule) and multi-scale context patches,
                  each read from the slide at the patch's centre
      -> finish:  ``datasets/<name>`` marked complete, last

Then the driver assigns splits by slide (or patient) and writes the dataset manifest, a
small JSON file that references the stores: the one thing the reader opens.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath._malloc import keep_large_buffers
from hpcpath.config import DatasetConfig
from hpcpath.errors import HpcpathError, OutputError
from hpcpath.files import find_stores, write_json
from hpcpath.stage import Unit, run_per_slide
from hpcpath.store import (
    DatasetMeta,
    StoreMeta,
    create_dataset,
    dataset_meta,
    finish_dataset,
    open_dataset_group,
    open_store,
    slide_source,
)

__all__ = ["build_dataset", "DatasetBuildResult"]

DATASET_FORMAT = "hpcpath-dataset/1"
_BLOCK = 2048  # label-raster pixels per block side
_MASK_SUFFIXES = (".tif", ".tiff")


def _is_annotation(path: Path) -> bool:
    """In a scanned folder: masks, XML, point tables and GeoJSON -- not slides, not other
    JSON (files named explicitly are always read, so a bad one gets its error)."""
    if not path.is_file() or path.name.startswith("."):
        return False
    suffix = path.suffix.lower()
    if suffix in _MASK_SUFFIXES:
        from hpcpath.io.discover import _is_label_mask

        return _is_label_mask(path)
    if suffix in (".xml", ".csv", ".geojson"):
        return True
    if suffix == ".json":
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
            return b'"FeatureCollection"' in head or b'"Feature"' in head or head.lstrip()[:1] == b"["
        except OSError:
            return False
    return False


# ----------------------------------------------------------------------------- worker side
def _tile_boxes(index: np.ndarray, tile_side0: float) -> np.ndarray:
    n = len(index)
    return np.stack(
        [index[:, 0], index[:, 1], np.full(n, tile_side0), np.full(n, tile_side0)], 1
    ).astype(np.float64)


def _positive_labels(cfg: DatasetConfig, labels: list[str]) -> set[str]:
    """Labels counted as positive in one file whose objects carry ``labels``: the configured
    classes, plus unclassified objects -- always (``unclassified: positive``), never
    (``ignore``), or (``auto``) only when nothing in the file has a class of its own, so an
    unclassified outline beside classified tumour regions (a QuPath habit) stays out."""
    from hpcpath.annotations import UNCLASSIFIED

    if cfg.unclassified == "auto":
        add = not (set(labels) - {UNCLASSIFIED} - set(cfg.exclude_classes))
    else:
        add = cfg.unclassified == "positive"
    return set(cfg.classes) | ({UNCLASSIFIED} if add else set())


def label_pixel(store_meta: StoreMeta, cfg: DatasetConfig) -> float:
    """Level-0 px per label-raster px: ``label_downsample`` when set, else the tile's own
    pixel.  One label pixel per tile pixel makes the centre rule exact to one tile pixel
    whatever level 0 is: a fixed level-0 size is too coarse where level 0 itself is coarse
    (a DICOM at 29 um/px tiled with 16-px tiles has a 10-px centre)."""
    return float(cfg.label_downsample or store_meta.tiling.downsample)


def _region_labels(store_meta: StoreMeta, index: np.ndarray, ann_files: list[str], cfg: DatasetConfig):
    """Per-tile (centre label, region fraction) from masks and polygons, block by block so
    memory stays bounded by one block of the label raster."""
    from hpcpath.annotations import AnnotationSet, MaskAnnotation, read_annotations
    from hpcpath.annotations._errors import warn
    from hpcpath.labels import centre_boxes, region_fraction

    dims = store_meta.slide.dimensions
    side = store_meta.tiling.tile_side0
    masks, regions, cut_out = [], AnnotationSet(), AnnotationSet()
    for f in ann_files:
        if Path(f).suffix.lower() in _MASK_SUFFIXES:
            masks.append(MaskAnnotation(f, dims))
            continue
        a = read_annotations(f, label_map=cfg.label_map).clip(*dims)
        positive = _positive_labels(cfg, [r.label for r in a.regions])
        known = positive | set(cfg.exclude_classes)
        unknown = sorted({lbl for lbl in a.labels() if lbl not in known})
        if unknown and not cfg.ignore_unknown_classes:
            raise HpcpathError(f"unknown class {unknown[0]!r} (known: {', '.join(sorted(known))})", f)
        pos = a.filter(positive)
        if a.regions and not pos.regions:
            # the commonest silent failure: classes named differently from the config
            warn(pos.warnings, f, None, f"no region of class {', '.join(sorted(positive))} "
                 f"(found: {', '.join(unknown) or 'none'}); set classes or label_map")
        regions = AnnotationSet.concat([regions, pos])
        cut_out = AnnotationSet.concat([cut_out, a.filter(cfg.exclude_classes)])
    ld = label_pixel(store_meta, cfg)
    boxes = _tile_boxes(index, side)
    labels = np.zeros(len(index), np.uint8)
    fraction = np.zeros(len(index), np.float32)
    if not len(index):
        return labels, fraction, regions.warnings
    step = _BLOCK * ld
    bx, by = (index[:, 0] // step).astype(np.int64), (index[:, 1] // step).astype(np.int64)
    for key in np.unique(by * (1 << 20) + bx):
        sel = np.flatnonzero(by * (1 << 20) + bx == key)
        # raster origin on the label grid (so every block samples the same pixel centres)
        x0 = math.floor(boxes[sel, 0].min() / ld) * ld
        y0 = math.floor(boxes[sel, 1].min() / ld) * ld
        w = int(math.ceil((boxes[sel, 0].max() + side - x0) / ld))
        h = int(math.ceil((boxes[sel, 1].max() + side - y0) / ld))
        raster = np.zeros((h, w), bool)
        for m in masks:
            raster |= m.read_region(x0, y0, w, h, ld) > 0
        if regions.regions:
            raster |= regions.rasterize((h, w), origin=(x0, y0), downsample=ld) > 0
        if cut_out.regions:  # exclusions carve out of masks and polygons alike
            raster &= cut_out.rasterize((h, w), origin=(x0, y0), downsample=ld) == 0
        if not raster.any():  # most blocks of a slide: nothing annotated
            continue
        # one summed-area table for both: the tiles (fraction) and their centre squares
        # (the centre label, as labels.centre_labels: any annotated pixel centre inside)
        both = region_fraction(raster, ld, np.concatenate(
            [boxes[sel], centre_boxes(boxes[sel], cfg.centre_fraction)]), origin=(x0, y0))
        fraction[sel], labels[sel] = both[:len(sel)], both[len(sel):] > 0
    for m in masks:
        m.close()
    if cfg.rule == "fraction":
        labels = (fraction >= cfg.fraction_threshold).astype(np.uint8)
    return labels, fraction, regions.warnings


def _point_items(store_meta: StoreMeta, index: np.ndarray, ann_files: list[str], cfg: DatasetConfig):
    """Positive centres on annotated points (jittered, rotated) and negative centres drawn
    from tissue-tile centres at least D from every point."""
    from hpcpath.annotations import AnnotationSet, read_annotations
    from hpcpath.labels import negative_centres, point_patches, scaled_distance

    point_files = [f for f in ann_files if Path(f).suffix.lower() not in _MASK_SUFFIXES]
    sets = [read_annotations(f, label_map=cfg.label_map) for f in point_files]
    pts = AnnotationSet.concat(sets)
    keep = [_positive_labels(cfg, [p.label for p in a.points]) for a in sets]  # per file
    xy = np.array([[p.x, p.y] for a, k in zip(sets, keep) for p in a.points if p.label in k],
                  np.float64).reshape(-1, 2)
    xy = np.unique(xy, axis=0)  # the same point from two files (CSV + GeoJSON) counts once
    side = store_meta.tiling.tile_side0
    pos = point_patches(xy, patch_px=side, jitter_px=cfg.jitter_px, rotations=cfg.rotations,
                        n_per_point=cfg.n_per_point, seed=cfg.seed)
    mpp = store_meta.mpp
    dist = scaled_distance(cfg.min_distance_px, mpp) if mpp else cfg.min_distance_px
    cands = index[:, :2].astype(np.float64) + side / 2
    neg = negative_centres(cands, xy, min_distance_px=dist, n=cfg.negatives_per_slide, seed=cfg.seed)
    centres = np.concatenate([pos.centres, neg]).reshape(-1, 2)
    labels = np.concatenate([np.ones(len(pos.centres), np.uint8), np.zeros(len(neg), np.uint8)])
    rot = np.concatenate([np.asarray(pos.quarter_turns, np.int8).reshape(-1), np.zeros(len(neg), np.int8)])
    return centres, labels, rot, float(dist), pts.warnings


def label_slide(store: str, ann_files: list[str], cfg: DatasetConfig, chunk: int) -> dict[str, Any]:
    """Worker task: labels for one store; creates ``datasets/<name>`` (not yet complete)."""
    try:
        return _label_slide(store, ann_files, cfg, chunk)
    except HpcpathError as exc:
        return {"error": str(exc)}


def _label_slide(store: str, ann_files: list[str], cfg: DatasetConfig, chunk: int) -> dict[str, Any]:
    from hpcpath.codecs import array_codecs

    st = open_store(store)
    meta = st.metadata
    index = st.index
    t = meta.tiling.tile_size
    side = meta.tiling.tile_side0
    extra: dict[str, Any] = {}
    if cfg.rule == "points":
        centres, labels, rot, dist, warnings = _point_items(meta, index, ann_files, cfg)
        item_index = np.full(len(centres), -1, np.int64)
        fraction = None
        extra["min_distance_px"] = dist
    else:
        labels, fraction, warnings = _region_labels(meta, index, ann_files, cfg)
        extra["label_downsample"] = label_pixel(meta, cfg)
        centres = index[:, :2].astype(np.float64) + side / 2
        item_index = np.arange(len(index), dtype=np.int64)
        rot = np.zeros(len(index), np.int8)
    k = len(labels)
    g = create_dataset(store, cfg.name, DatasetMeta(
        rule=cfg.rule, classes=tuple(cfg.classes), config=cfg.model_dump(mode="json"), items=k,
        positives=int(labels.sum()), source="patches" if cfg.rule == "points" else "tiles",
        patch_downsample=meta.tiling.downsample, patch_size=t, **extra))
    c = max(1, min(k, 65536))
    g.create_array("labels", data=labels, chunks=(c,))
    g.create_array("centres", data=centres.reshape(-1, 2), chunks=(c, 2))
    g.create_array("item_index", data=item_index, chunks=(c,))
    g.create_array("rotation", data=rot, chunks=(c,))
    if fraction is not None:
        g.create_array("fraction", data=fraction, chunks=(c,))
    image_arrays = (["images"] if cfg.rule == "points" else []) + [
        f"context/{r:g}" for r in cfg.context_downsamples
    ]
    for name in image_arrays:
        g.create_array(
            name, shape=(k, t, t, 3), dtype="uint8", chunks=(max(1, min(chunk, k)), t, t, 3),
            fill_value=0, config={"write_empty_chunks": True}, **array_codecs("blosc-lz4"),
        )
    return {"items": k, "positives": int(labels.sum()), "image_arrays": image_arrays,
            "warnings": list(dict.fromkeys(warnings))}  # one per defect: the CLI prints each


def write_patches(store: str, slide_path: str, name: str, array: str, start: int, stop: int) -> int:
    """Worker task: patch pixels [start, stop) of ``array`` ("images" or "context/<r>"),
    each a T x T read centred on the item's level-0 centre."""
    from hpcpath.io import open_slide

    keep_large_buffers()
    g = open_dataset_group(store, name, "r+")
    info = dataset_meta(g)
    t, ds = info.patch_size, float(info.patch_downsample or 1.0)
    if array != "images":
        ds = ds * float(array.split("/", 1)[1])
    centres = np.asarray(g["centres"][start:stop], np.float64)
    slide = open_slide(slide_path, cached=True)
    out = np.empty((len(centres), t, t, 3), np.uint8)
    for i, (cx, cy) in enumerate(centres):
        out[i] = slide.read_scaled(cx - t * ds / 2, cy - t * ds / 2, t, t, ds)
    g[array][start:stop] = out
    return stop - start


# ----------------------------------------------------------------------------- driver
_MANIFEST_WARNINGS = 20  # per slide; every one is reported as it happens (on_event)


def _first_warnings(warnings: list[str]) -> list[str]:
    """The warnings a manifest keeps for a slide: the first few and how many more there were
    (a hand-drawn nucleus file can have hundreds, each already reported)."""
    if len(warnings) <= _MANIFEST_WARNINGS:
        return list(warnings)
    more = len(warnings) - _MANIFEST_WARNINGS
    return [*warnings[:_MANIFEST_WARNINGS], f"... and {more} more warnings"]


@dataclass
class DatasetBuildResult:
    manifest: Path
    slides: dict[str, dict]
    failed: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.failed


def _patients(cfg: DatasetConfig, slide_ids: list[str]) -> dict[str, str]:
    if cfg.split.by != "patient":
        return {s: s for s in slide_ids}
    from hpcpath.annotations import read_label_table

    table = read_label_table(cfg.split.patient_table)
    missing = [s for s in slide_ids if s not in table]
    if missing:
        raise HpcpathError(f"no patient for slide {missing[0]!r}", cfg.split.patient_table)
    return {s: str(table[s]) for s in slide_ids}


def build_dataset(
    stores: list[str | os.PathLike],
    annotations: list[str | os.PathLike],
    out: str | os.PathLike,
    cfg: DatasetConfig | None = None,
    *,
    slide_dirs: Sequence[str | os.PathLike] = (),
    client=None,
    on_event: Callable[[str, dict], None] | None = None,
    chunk: int = 64,
) -> DatasetBuildResult:
    """Label every store, add context/patch pixels, split, and write the manifest ``out``."""
    from hpcpath.annotations import match_annotations
    from hpcpath.labels import split_groups
    from hpcpath.stage import as_backend
    from hpcpath.store import open_store

    cfg = cfg or DatasetConfig()
    backend = as_backend(client)
    emit = on_event or (lambda kind, info: None)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", out.parent) from None
    paths = find_stores(stores)
    metas = {p: open_store(p).metadata for p in paths}  # complete stores only (refuses partial)
    by_id = {m.slide_id: p for p, m in metas.items()}
    ann_paths: list[Path] = []
    for a in annotations:
        a = Path(a)
        ann_paths += sorted(c for c in a.iterdir() if _is_annotation(c)) if a.is_dir() else [a]
    matched = match_annotations(list(by_id), ann_paths)  # errors on annotations with no slide
    need_pixels = cfg.rule == "points" or bool(cfg.context_downsamples)
    dirs = [Path(d) for d in slide_dirs]
    sources: dict[str, Path | None] = {}
    failed: dict[str, str] = {}
    plans = {}
    for sid, p in by_id.items():
        src = slide_source(p, metas[p], dirs) if need_pixels else None
        if need_pixels and src is None:
            failed[sid] = f"{p}: slide file {metas[p].slide.source_name!r} not found (pass --slides DIR)"
            emit("failed", {"slide_id": sid, "error": failed[sid]})
            continue
        sources[sid] = src
        plans[sid] = (label_slide, (str(p), [str(f) for f in matched.get(sid, [])], cfg, chunk))
    done: dict[str, dict] = {}

    def expand(sid: str, plan: dict) -> list:
        for w in plan.get("warnings", []):
            emit("warning", {"slide_id": sid, "warning": w})
        return [Unit(write_patches, (str(by_id[sid]), str(sources[sid]), cfg.name, arr, a,
                                     min(plan["items"], a + chunk * 4)),
                     arr, ("patches", arr, a, cfg.name), retries=2)
                for arr in plan["image_arrays"] for a in range(0, plan["items"], chunk * 4)]

    def finish(sid: str, o) -> None:
        if o.error is None:
            try:
                finish_dataset(str(by_id[sid]), cfg.name)
            except Exception as exc:  # noqa: BLE001
                o.error = str(exc)
        if o.error is not None:
            failed[sid] = o.error
            emit("failed", {"slide_id": sid, "error": o.error})
        else:
            done[sid] = {"items": o.plan["items"], "positives": o.plan["positives"],
                         "warnings": _first_warnings(o.plan.get("warnings", []))}
            emit("slide", {"slide_id": sid, **done[sid]})

    run_per_slide(backend, plans, expand, finish, stage="dataset", key=cfg.name, label=str(out))

    ids = sorted(done)
    patient = _patients(cfg, ids)
    groups = sorted(set(patient.values()))
    pos_group = {g: int(any(done[s]["positives"] > 0 for s in ids if patient[s] == g)) for g in groups}
    split_of_group = split_groups(groups, cfg.split.fractions,
                                  stratify=pos_group if cfg.split.stratify else None, seed=cfg.split.seed)
    manifest = {
        "format": DATASET_FORMAT,
        "name": cfg.name,
        "rule": cfg.rule,
        "classes": list(cfg.classes),
        "context_downsamples": list(cfg.context_downsamples),
        "negatives_per_positive": cfg.negatives_per_positive,
        "seed": cfg.seed,
        "slides": [
            {"slide_id": s, "store": os.path.relpath(by_id[s], out.parent), "patient": patient[s],
             "split": split_of_group[patient[s]], **done[s]}
            for s in ids
        ],
        "failed": failed,
    }
    write_json(out, manifest)  # written last: a dataset manifest only lists complete slides
    return DatasetBuildResult(out, done, failed)

"""Model-bootstrapped false-positive oversampling (hard-negative mining).

The current model scores every negative of the train split; negatives scored at or above a
threshold are the false positives worth seeing more often, and the next round of training
repeats each of them ``oversample`` times on top of its class-balanced draw.  Each rank
scores a contiguous block of the negatives (whole chunks), the scores are gathered, and all
ranks agree on the same hard list.  Standalone (``hpcpath mine``), the list is written as
``hpcpath-hard-negatives/1`` JSON naming items by slide and row, which ``hard_negatives:``
in a train config (or ``hpcpath train --hard-negatives``) reads back.

For points datasets (mitoses) the negatives in the dataset are a random draw of tissue
spots, so the model's real mistakes -- dark nuclei, debris -- may never be in it.  A slide
round (:func:`mine_slides`, ``hpcpath mine --annotations``) does what the seeds do: detect
over the whole training slides, take the detections far from every true mitosis, append
them to a new dataset as negatives, and retrain on it with those items oversampled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hpcpath.errors import HpcpathError
from hpcpath.files import write_json

__all__ = ["score_negatives", "hard_negative_indices", "mine", "load_hard_negatives",
           "mine_slides", "far_false_positives", "extend_points_dataset"]

FORMAT = "hpcpath-hard-negatives/1"


def score_negatives(data, engine, cfg, eval_step) -> tuple[np.ndarray, np.ndarray]:
    """``(indices into data.train, score)`` for every train negative, on every rank."""
    from hpcpath.train.data import read_order, subset, tf_batches

    lab = data.train.labels if data.train.labels.ndim == 1 else data.train.labels.max(axis=1)
    neg = np.flatnonzero(lab == 0)
    neg = neg[read_order(subset(data.train, neg))]  # chunk order: each block reads whole chunks
    lo = len(neg) * engine.rank // engine.size
    hi = len(neg) * (engine.rank + 1) // engine.size
    mine = subset(data.train, neg[lo:hi])
    scores = []
    for x, _y in tf_batches(mine.batches(max(cfg.batch_size, 64), context=cfg.context), data):
        _loss, p = eval_step(x, _y)
        scores.append(np.asarray(p).max(axis=1))
    local = np.concatenate(scores) if scores else np.zeros(0, np.float64)
    if len(local) != hi - lo:
        raise HpcpathError(f"scored {len(local)} of {hi - lo} negatives")
    return neg, engine.allgather(local.astype(np.float64))


def hard_negative_indices(model, data, engine, cfg, eval_step) -> tuple[np.ndarray, np.ndarray]:
    """The negatives scored >= ``cfg.mining.threshold`` (at most ``max_items``, highest first)."""
    idx, scores = score_negatives(data, engine, cfg, eval_step)
    keep = np.flatnonzero(scores >= cfg.mining.threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if cfg.mining.max_items:
        keep = keep[: cfg.mining.max_items]
    return np.sort(idx[keep]), scores[keep]


def mine(cfg, model_dir: str | os.PathLike, out: str | os.PathLike, *, threshold: float | None = None,
         engine=None) -> dict:
    """Score the train negatives of ``cfg.dataset`` with a saved model; write the hard ones."""
    from hpcpath.modelio import load_model
    from hpcpath.train.data import open_train_data
    from hpcpath.train.engine import make_engine
    from hpcpath.train.loop import make_steps, preflight

    preflight(cfg)
    data = open_train_data(cfg)
    engine = engine or make_engine(cfg.engine)
    model, meta = load_model(model_dir)
    if meta.patch_size != data.patch_size:
        raise HpcpathError(f"model takes {meta.patch_size} px patches, the dataset has "
                           f"{data.patch_size} px", model_dir)
    import keras

    _, eval_step = make_steps(model, keras.optimizers.Adam(), engine)
    thr = cfg.mining.threshold if threshold is None else threshold
    idx, scores = score_negatives(data, engine, cfg, eval_step)
    keep = np.flatnonzero(scores >= thr)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    if cfg.mining.max_items:
        keep = keep[: cfg.mining.max_items]
    tr = data.train
    doc = {"format": FORMAT, "dataset": str(cfg.dataset), "name": tr.name, "threshold": thr,
           "negatives_scored": int(len(idx)),
           "items": [[tr.slide_ids[int(tr.store_of[i])], int(tr.item[i]), round(float(s), 6)]
                     for i, s in zip(idx[keep], scores[keep])]}
    if engine.is_chief:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, doc, indent=1)
    return doc


def load_hard_negatives(path: str | os.PathLike, train) -> np.ndarray:
    """Indices into ``train`` of the items listed in a hard-negatives file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise HpcpathError(f"unreadable hard-negatives file ({exc})", path) from None
    if doc.get("format") != FORMAT:
        raise HpcpathError("not an hpcpath hard-negatives file (run hpcpath mine)", path)
    slide_index = {s: i for i, s in enumerate(train.slide_ids)}
    key = train.store_of.astype(np.int64) * (1 << 32) + train.item
    lookup = dict(zip(key.tolist(), range(len(key))))
    out = []
    for slide, item, _score in doc["items"]:
        i = lookup.get(slide_index.get(slide, -1) * (1 << 32) + int(item))
        if i is None:
            raise HpcpathError(f"item {slide}:{item} is not in the train split of this dataset", path)
        out.append(i)
    return np.asarray(sorted(out), np.int64)


# ----------------------------------------------------------------------------- slide rounds
def _truth_points(ann_files, dcfg) -> np.ndarray:
    """(N, 2) level-0 points of the dataset's positive classes in ``ann_files`` (the same
    per-file class rule ``hpcpath dataset build --rule points`` applies)."""
    from hpcpath.annotations import read_annotations
    from hpcpath.dataset.build import _MASK_SUFFIXES, _positive_labels

    out = []
    for f in ann_files:
        if Path(f).suffix.lower() in _MASK_SUFFIXES:
            continue  # region masks hold no points
        a = read_annotations(f, label_map=dcfg.label_map)
        keep = _positive_labels(dcfg, [p.label for p in a.points])
        out += [[p.x, p.y] for p in a.points if p.label in keep]
    return np.unique(np.asarray(out, np.float64).reshape(-1, 2), axis=0)  # CSV + GeoJSON: once


def far_false_positives(det: np.ndarray, truth: np.ndarray, min_distance: float) -> np.ndarray:
    """Indices of the detections (``(N, >=2)`` x, y, ...) farther than ``min_distance`` from
    every truth point: false positives that cannot be a displaced hit on a real mitosis."""
    det = np.asarray(det, np.float64)
    if det.size == 0:
        return np.zeros(0, np.int64)
    det = det.reshape(len(det), -1)
    if len(truth) == 0:
        return np.arange(len(det))
    from scipy.spatial import cKDTree

    d, _ = cKDTree(np.asarray(truth, np.float64)).query(det[:, :2])
    return np.flatnonzero(d > min_distance)


def extend_points_dataset(store: str, slide_path: str | None, name: str, new: str,
                          centres: np.ndarray, scores: np.ndarray) -> dict:
    """Worker task: ``datasets/<new>`` in ``store`` = every item of ``datasets/<name>``
    followed by one negative per centre (patch pixels read from the slide at the item's
    level-0 centre, context patches too), marked complete last.  Returns the new counts."""
    from hpcpath.codecs import array_codecs
    from hpcpath.store import create_dataset, dataset_meta, finish_dataset, open_dataset_group

    old = open_dataset_group(store, name)
    info = dataset_meta(old)
    k0, k = info.items, len(centres)
    info = info.replace(items=k0 + k, extra={**info.extra, "mined": {
        "from": name, "hard_negatives": k, "first_item": k0,
        "scores": [round(float(s), 6) for s in scores]}})
    g = create_dataset(store, new, info)
    arrays = ["labels", "centres", "item_index", "rotation"] + [
        a for a in ("images", *(f"context/{r:g}" for r in info.context_downsamples)) if a in old]
    extra: dict[str, np.ndarray] = {
        "labels": np.zeros(k, np.uint8), "centres": np.asarray(centres, np.float64).reshape(-1, 2),
        "item_index": np.full(k, -1, np.int64), "rotation": np.zeros(k, np.int8)}
    if k and any(a == "images" or a.startswith("context/") for a in arrays):
        if not slide_path:
            raise HpcpathError("the slide file is needed to read hard-negative patches (pass --slides)", store)
        from hpcpath.io import open_slide

        slide = open_slide(slide_path, cached=True)
        t, ds0 = info.patch_size, float(info.patch_downsample or 1.0)
        for a in arrays:
            if a == "images" or a.startswith("context/"):
                ds = ds0 * (1.0 if a == "images" else float(a.split("/", 1)[1]))
                extra[a] = np.stack([slide.read_scaled(cx - t * ds / 2, cy - t * ds / 2, t, t, ds)
                                     for cx, cy in extra["centres"]])
    for a in arrays:
        src = old[a]
        data = np.asarray(src[:])
        if a in extra:
            data = np.concatenate([data, extra[a].astype(data.dtype).reshape(-1, *data.shape[1:])])
        kw = array_codecs("blosc-lz4") if data.ndim == 4 else {}
        g.create_array(a, data=data, chunks=(max(1, min(src.chunks[0], len(data))), *data.shape[1:]), **kw)
    finish_dataset(store, new)  # the completion marker, last
    return {"items": k0 + k, "positives": info.positives, "added": k, "first_item": k0}


def mine_slides(cfg, model_dir: str | os.PathLike, out_dir: str | os.PathLike, annotations,
                *, slide_dirs=(), infer_cfg=None, threshold: float | None = None,
                min_distance_px: float | None = None, max_per_slide: int | None = None,
                name: str | None = None, retrain: bool = True, client=None,
                on_event=None) -> dict:
    """One round of hard-negative mining as the seeds do it, for a points dataset:

    1. detect with the model over every *train* slide of ``cfg.dataset`` (``hpcpath infer``,
       two-stage by default, detections ``>= threshold``) into ``OUT/detections``;
    2. keep the false positives farther than the dataset's negative distance
       (``min_distance_px``, as the dataset build scaled it to the slide) from every truth
       point of ``annotations`` (the files the dataset was built from);
    3. write dataset ``<name>-mined`` (every old item, those hard negatives appended, patches
       read from the slide) and its manifest ``OUT/dataset.json``, plus
       ``OUT/hard-negatives.json`` listing the new items (oversampled ``mining.oversample``
       times per epoch);
    4. with ``retrain``, train the config again on them into ``OUT/train``.

    Returns a summary dict (``manifest``, ``hard_negatives``, ``per_slide``, ``model_dir``).
    """
    from hpcpath.annotations import match_annotations
    from hpcpath.config import DatasetConfig, InferConfig
    from hpcpath.dataset.build import _is_annotation
    from hpcpath.infer import infer_slides, open_predictions
    from hpcpath.store import dataset_meta, open_dataset_group, open_store, slide_source

    emit = on_event or (lambda kind, info: None)
    out = Path(out_dir)
    manifest = Path(cfg.dataset)
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        raise HpcpathError(f"unreadable dataset manifest ({exc})", manifest) from None
    if doc.get("rule") != "points":
        raise HpcpathError(f"mining whole slides needs a points dataset (this one's rule is "
                           f"{doc.get('rule')!r}); a tile dataset already holds every tile: run "
                           "hpcpath mine without --annotations", manifest)
    slides = doc["slides"]
    train = [s for s in slides if s["split"] == cfg.train_split]
    if not train:
        raise HpcpathError(f"no slide in split {cfg.train_split!r}", manifest)
    stores = {s["slide_id"]: (manifest.parent / s["store"]).resolve() for s in slides}
    ann: list[Path] = []
    for a in annotations:
        a = Path(a)
        if not a.exists():
            raise HpcpathError("no such annotation file or folder", a)
        ann += sorted(c for c in a.iterdir() if _is_annotation(c)) if a.is_dir() else [a]
    matched = match_annotations(list(stores), ann)
    thr = cfg.mining.threshold if threshold is None else float(threshold)
    icfg = (infer_cfg or InferConfig(mode="two-stage")).model_copy(
        update={"name": (infer_cfg.name if infer_cfg and infer_cfg.name else "hpcpath-mine"),
                "threshold": thr})
    truths, dinfos = {}, {}

    for s in train:  # truth and dataset attributes first: a bad file fails before any work
        sid = s["slide_id"]
        dinfos[sid] = dataset_meta(open_dataset_group(stores[sid], doc["name"]))
        truths[sid] = _truth_points(matched[sid], DatasetConfig(**dinfos[sid].config))
    emit("detect", {"slides": len(train)})
    res = infer_slides([stores[s["slide_id"]] for s in train], model_dir, out / "detections", icfg,
                       client=client, slide_dirs=list(slide_dirs))
    if not res.ok:
        bad = res.failed[0]
        raise HpcpathError(f"detection failed on {len(res.failed)} slide(s): {bad['error']}")
    new = name or f"{doc['name']}-mined"
    if new == doc["name"]:
        raise HpcpathError(f"the mined dataset needs a new name (not {new!r})", manifest)
    per_slide, futures, mined = [], {}, {}
    for s in slides:
        sid, st = s["slide_id"], stores[s["slide_id"]]
        root_meta = open_store(st).metadata
        centres, scores = np.zeros((0, 2)), np.zeros(0)
        mined[sid] = scores
        if sid in truths:
            dist_or_none = min_distance_px if min_distance_px is not None else dinfos[sid].min_distance_px
            if dist_or_none is None:
                raise HpcpathError(f"datasets/{doc['name']} records no min_distance_px; pass one", st)
            dist = float(dist_or_none)
            det = open_predictions(st, str(icfg.name)).detections
            det = det[det[:, 2] >= thr] if len(det) else det.reshape(0, 3)
            truth = truths[sid]
            far = far_false_positives(det, truth, dist)
            far = far[np.argsort(-det[far, 2], kind="stable")][:max_per_slide]
            centres, scores = det[far, :2], det[far, 2]
            mined[sid] = scores
            per_slide.append({"slide_id": sid, "detections": int(len(det)), "truth": int(len(truth)),
                              "hard_negatives": int(len(far)), "min_distance_px": dist})
        src = slide_source(st, root_meta, [Path(d) for d in slide_dirs])
        futures[sid] = client.submit(extend_points_dataset, str(st), str(src) if src else None,
                                     doc["name"], new, centres, scores, pure=False)
    counts = {sid: f.result() for sid, f in futures.items()}
    out.mkdir(parents=True, exist_ok=True)
    new_doc = {**doc, "name": new, "mined": {"from": str(manifest), "model": str(model_dir),
                                             "threshold": thr, "per_slide": per_slide},
               "slides": [{**s, "store": os.path.relpath(stores[s["slide_id"]], out.resolve()),
                           "items": counts[s["slide_id"]]["items"],
                           "positives": counts[s["slide_id"]]["positives"]} for s in slides]}
    new_manifest = out / "dataset.json"
    _write_json(new_manifest, new_doc)
    items = [[sid, int(c["first_item"] + i), round(float(sc), 6)]
             for sid, c in sorted(counts.items()) for i, sc in enumerate(mined[sid])]
    hard = {"format": FORMAT, "dataset": str(new_manifest), "name": new, "threshold": thr,
            "source": "slides", "negatives_scored": int(sum(p["detections"] for p in per_slide)),
            "items": items}
    _write_json(out / "hard-negatives.json", hard)
    summary = {"manifest": str(new_manifest), "hard_negatives_file": str(out / "hard-negatives.json"),
               "hard_negatives": len(items), "per_slide": per_slide, "model_dir": None}
    if retrain:
        from hpcpath.train import train as run_training

        cfg2 = cfg.model_copy(update={"dataset": str(new_manifest), "out": str(out / "train"),
                                      "hard_negatives": str(out / "hard-negatives.json")})
        emit("train", {"dataset": str(new_manifest)})
        result = run_training(cfg2)
        summary["model_dir"] = str(result.model_dir) if result.model_dir else None
    return summary


def _write_json(path: Path, doc: dict) -> None:
    write_json(path, doc, indent=1)

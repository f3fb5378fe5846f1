"""Model-bootstrapped false-positive oversampling (hard-negative mining).

The current model scores every negative of the train split; negatives scored at or above a
threshold are the false positives worth seeing more often, and the next round of training
repeats each of them ``oversample`` times on top of its class-balanced draw.  Each rank
scores a contiguous block of the negatives (whole chunks), the scores are gathered, and all
ranks agree on the same hard list.  Standalone (``hpcpath mine``), the list is written as
``hpcpath-hard-negatives/1`` JSON naming items by slide and row, which ``hard_negatives:``
in a train config (or ``hpcpath train --hard-negatives``) reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from hpcpath.errors import HpcpathError

__all__ = ["score_negatives", "hard_negative_indices", "mine", "load_hard_negatives"]

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
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)
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

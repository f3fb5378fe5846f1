"""What each rank reads, epoch by epoch.

An epoch's item table is a pure function of ``(seed, epoch)`` and the current hard
negatives: every positive, a fresh seeded draw of negatives (class-balanced batches), plus
the oversampled hard negatives.  Every rank computes the same table and reads only its own
shard of it (``PatchDataset.shard``: whole Zarr chunks dealt round-robin), so ranks never
read the same item in an epoch, and a resumed run reads exactly what the killed run would
have read.  All ranks take the same number of steps (a rank whose shard runs short goes on
with the next seeded pass over it), since every step is a collective.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from hpcpath.dataset.reader import Batch, PatchDataset, open_dataset
from hpcpath.errors import ConfigError, HpcpathError
from hpcpath.labels import balance
from hpcpath.modelio import task_for

__all__ = ["TrainData", "open_train_data", "subset", "epoch_items", "rank_batches",
           "tf_batches", "read_order"]


@dataclass(frozen=True)
class TrainData:
    train: PatchDataset
    val: PatchDataset | None
    classes: tuple[str, ...]
    task: str  # "binary" | "multilabel" | "points" (hpcpath.modelio.task_for)
    patch_size: int
    context_names: tuple[str, ...]

    @property
    def n_outputs(self) -> int:
        return len(self.classes) if self.task == "multilabel" else 1


def subset(ds: PatchDataset, idx: np.ndarray) -> PatchDataset:
    """Items ``idx`` of ``ds`` (repeats allowed: oversampling)."""
    idx = np.asarray(idx, dtype=np.int64)
    return replace(ds, store_of=ds.store_of[idx], item=ds.item[idx], labels=ds.labels[idx],
                   chunk=ds.chunk[idx])


def _any_positive(labels: np.ndarray) -> np.ndarray:
    return labels if labels.ndim == 1 else labels.max(axis=1)


def _rule(manifest) -> str | None:
    """The labelling rule the dataset manifest was built with (None when it does not say)."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(manifest).read_text()).get("rule")
    except (OSError, ValueError, AttributeError):
        return None


def open_train_data(cfg) -> TrainData:
    """The train and validation tables of ``cfg.dataset``, label columns chosen, checked."""
    ds = open_dataset(cfg.dataset)
    classes = tuple(ds.classes)
    if cfg.classes:
        missing = [c for c in cfg.classes if c not in classes]
        if missing:
            raise ConfigError(f"classes: {missing[0]!r} is not a label column of dataset "
                              f"{ds.name!r} (it has: {', '.join(classes)})", cfg.dataset)
        if ds.labels.ndim == 2:
            cols = [classes.index(c) for c in cfg.classes]
            ds = replace(ds, labels=ds.labels[:, cols], classes=tuple(cfg.classes))
            classes = tuple(cfg.classes)
    task = task_for(_rule(cfg.dataset), ds.labels.shape[1] if ds.labels.ndim == 2 else 1)
    if ds.labels.ndim == 2 and task != "multilabel":
        ds = replace(ds, labels=ds.labels[:, 0])
    train = ds.select(cfg.train_split)
    if len(train) == 0:
        raise HpcpathError(f"dataset has no items in split {cfg.train_split!r} "
                           f"({len(ds)} items in all)", cfg.dataset)
    if not _any_positive(train.labels).any():
        raise HpcpathError(f"split {cfg.train_split!r} has no positive items: nothing to learn",
                           cfg.dataset)
    val = None
    if cfg.val_split:
        val = ds.select(cfg.val_split)
        if len(val) == 0:
            raise HpcpathError(f"dataset has no items in split {cfg.val_split!r}; set val_split "
                               "to another split or null", cfg.dataset)
    first = next(train.batches(1, context=cfg.context))
    ctx = tuple(sorted(first.context)) if cfg.context else ()
    if cfg.context and not ctx:
        raise ConfigError("context: true but the dataset has no context patches (build it with "
                          "--context 4)", cfg.dataset)
    return TrainData(train, val, classes, task, int(first.images.shape[1]), ctx)


def epoch_items(labels: np.ndarray, balance_ratio: float | None, seed: int, epoch: int,
                hard: np.ndarray | None = None, oversample: int = 1) -> np.ndarray:
    """Indices (into the train table) of one epoch's items: positives, a seeded draw of
    ``balance_ratio`` negatives per positive (all items when None), hard negatives repeated."""
    lab = _any_positive(labels)
    if balance_ratio is None:
        idx = np.arange(len(lab), dtype=np.int64)
    else:
        idx = balance(lab, balance_ratio, seed=int(seed) * 1_000_003 + int(epoch))
    if hard is not None and len(hard):
        idx = np.concatenate([idx, np.repeat(np.asarray(hard, np.int64), oversample)])
    return np.sort(idx, kind="stable")


def rank_batches(shard: PatchDataset, batch_size: int, steps: int, *, seed: int, epoch: int,
                 skip: int = 0, context: bool = False, encoded: bool = False) -> Iterator[Batch]:
    """Exactly ``steps`` full batches of this rank's shard, seeded by ``(seed, epoch)``; the
    first ``skip`` are drawn and dropped (resume inside an epoch).  The size check runs here,
    at the call, not inside TensorFlow's generator (where it would become a traceback)."""
    if len(shard) < batch_size:
        raise HpcpathError(f"a rank's shard holds {len(shard)} items, fewer than one batch of "
                           f"{batch_size}: lower batch_size or use fewer ranks")
    if encoded and shard.encoded_format() != "jpeg":
        raise HpcpathError("jpeg_decode: tf needs every store to be a passthrough JPEG store "
                           "(tiled with --passthrough auto from JPEG slides); use jpeg_decode: reader")
    return _rank_batches(shard, batch_size, steps, seed=seed, epoch=epoch, skip=skip, context=context,
                         encoded=encoded)


def _rank_batches(shard: PatchDataset, batch_size: int, steps: int, *, seed: int, epoch: int,
                  skip: int, context: bool, encoded: bool = False) -> Iterator[Batch]:
    n, rnd = 0, 0
    while n < steps:
        for b in shard.batches(batch_size, shuffle=True, seed=seed, epoch=epoch * 1000 + rnd,
                               context=context, drop_remainder=True, encoded=encoded):
            if n >= skip:
                yield b
            n += 1
            if n == steps:
                return
        rnd += 1


def read_order(ds: PatchDataset) -> np.ndarray:
    """The order in which ``ds.batches(shuffle=False)`` yields its items (read-unit order)."""
    return np.argsort(ds.store_of.astype(np.int64) * (1 << 32) + ds.chunk, kind="stable")


def digest(batch: Batch) -> str:
    h = hashlib.sha1(batch.labels.tobytes())
    if batch.images.dtype == object:  # encoded tiles (jpeg_decode: tf)
        for t in batch.images:
            h.update(t)
    else:
        h.update(batch.images[:, ::7, ::7].tobytes())
    return h.hexdigest()[:16]


def tf_batches(batches: Iterator[Batch], data: TrainData, *, augment=None, prefetch: int = 2,
               digests: deque | None = None, encoded: bool = False):
    """One pass of ``batches`` as a ``tf.data.Dataset`` of ``(x uint8, y float32 (B, n_outputs))``;
    x is a dict by input name for multi-scale models (see ``batches_to_tf``)."""
    from hpcpath.dataset.tfdata import batches_to_tf

    return batches_to_tf(lambda: batches, patch_size=data.patch_size, label_shape=(data.n_outputs,),
                         context_names=data.context_names, augment=augment, prefetch=prefetch,
                         on_batch=(lambda b: digests.append(digest(b))) if digests is not None else None,
                         encoded=encoded)

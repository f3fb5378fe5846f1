"""Ordinary images (ChestX-ray14 style: a folder of PNGs + a multi-label CSV) as a dataset.

The images are decoded and resized on the workers into one store per split,
``<name>-<split>.zarr``, split by patient so no patient crosses splits; the dataset manifest
then reads exactly like a slide dataset (each split store is one "slide" record).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.errors import HpcpathError, OutputError
from hpcpath.files import write_json
from hpcpath.stage import Unit, run_per_slide

__all__ = ["build_image_dataset"]


def _create_split_store(store: str, name: str, labels: np.ndarray, classes: list[str],
                        size: int, chunk: int) -> dict:
    """Worker task: an image store for one split, arrays created, nothing written yet."""
    from hpcpath.codecs import array_codecs
    from hpcpath.store import DatasetMeta, create_dataset, create_image_store

    create_image_store(store)
    n = len(labels)
    g = create_dataset(store, name, DatasetMeta(
        rule="multilabel", classes=tuple(classes), items=n,
        positives=int(labels.any(axis=1).sum()), source="patches", patch_size=size))
    c = max(1, min(n, 65536))
    g.create_array("labels", data=labels, chunks=(c, labels.shape[1]))
    g.create_array("rotation", data=np.zeros(n, np.int8), chunks=(c,))
    g.create_array("images", shape=(n, size, size, 3), dtype="uint8",
                   chunks=(max(1, min(chunk, n)), size, size, 3), fill_value=0,
                   config={"write_empty_chunks": True}, **array_codecs("blosc-lz4"))
    return {"items": n, "positives": int(labels.any(axis=1).sum())}


def _write_images(store: str, name: str, paths: list[str], start: int, size: int) -> int:
    """Worker task: decode, convert to RGB and resize images into rows [start, start+len)."""
    from PIL import Image

    from hpcpath.store import open_dataset_group

    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
        except OSError as exc:
            raise HpcpathError(f"cannot read image ({exc})", p) from None
    open_dataset_group(store, name, "r+")["images"][start : start + len(paths)] = out
    return len(paths)


def build_image_dataset(
    csv: str | os.PathLike,
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "cxr",
    classes: Sequence[str] | None = None,
    size: int = 224,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    chunk: int = 64,
    client=None,
    on_event: Callable[[str, dict], None] | None = None,
) -> Path:
    """Build ``out_dir/<name>.json`` (+ one store per split) from a ChestX-ray14 CSV."""
    from hpcpath.annotations import DEFAULT_CXR14, read_chestxray_csv
    from hpcpath.labels import split_groups
    from hpcpath.stage import as_backend

    backend = as_backend(client)
    emit = on_event or (lambda kind, info: None)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder ({exc.strerror})", out) from None
    cxr = read_chestxray_csv(csv, image_dir, classes or DEFAULT_CXR14)
    patients = [p or str(path) for p, path in zip(cxr.patient_ids, cxr.image_paths)]
    any_finding: dict[str, int] = {}
    for p, row in zip(patients, cxr.multi_hot):
        any_finding[p] = max(any_finding.get(p, 0), int(row.any()))
    groups = sorted(set(patients))
    split_of = split_groups(groups, fractions, stratify=any_finding, seed=seed)
    members = {s: [i for i, p in enumerate(patients) if split_of[p] == s] for s in ("train", "val", "test")}
    members = {s: m for s, m in members.items() if m}
    stores = {s: str(out / f"{name}-{s}.zarr") for s in members}
    plans = {
        s: (_create_split_store, (stores[s], name, cxr.multi_hot[m], list(cxr.classes), size, chunk))
        for s, m in members.items()
    }

    def expand(s: str, plan: dict) -> list:
        idx = members[s]
        return [
            Unit(_write_images, (stores[s], name, [str(cxr.image_paths[i]) for i in idx[a : a + chunk]], a, size),
                 "images", ("images", a, name), retries=2)
            for a in range(0, len(idx), chunk)
        ]

    failed: dict[str, str] = {}

    def finish(s: str, o) -> None:
        if o.error is None:
            from hpcpath.store import finish_dataset

            finish_dataset(stores[s], name)
            emit("slide", {"slide_id": s, "items": o.plan["items"]})
        else:
            failed[s] = o.error
            emit("failed", {"slide_id": s, "error": o.error})

    run_per_slide(backend, plans, expand, finish, stage="images", key=name, label=str(out_dir))
    if failed:
        split, err = next(iter(failed.items()))
        raise HpcpathError(f"{split} split failed: {err}", csv)
    manifest: dict[str, Any] = {
        "format": "hpcpath-dataset/1", "name": name, "rule": "multilabel",
        "classes": list(cxr.classes), "context_downsamples": [], "negatives_per_positive": None,
        "seed": seed,
        "slides": [
            {"slide_id": f"{name}-{s}", "store": f"{name}-{s}.zarr", "patient": "", "split": s,
             "items": len(m), "positives": int(cxr.multi_hot[m].any(axis=1).sum())}
            for s, m in members.items()
        ],
        "failed": {},
    }
    path = out / f"{name}.json"
    return write_json(path, manifest)

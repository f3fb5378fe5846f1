"""The inference driver: slides or stores in, predictions, detections and tables out.

The per-slide loop is ``hpcpath.stage.run_per_slide`` (the one tiling and dataset building
use): a plan task per store, then one prediction unit per row block (each with a GPU of its
own when the workers offer GPUs: Dask's ``resources={"GPU": 1}``, Spark's task GPU
address), then a finishing unit.  No pixel reaches the driver;
it reads each slide's small summary from the store when the slide is done and rewrites the
run tables (``summary.csv``, ``tasks.csv``) atomically.

Restarts: a store whose ``predictions/<name>`` is complete with the same ``params_key``
(model content + options) and whose output files exist is skipped; anything else is
redone from its plan.  A worker lost mid-slide (Slurm job cancelled, node killed) makes Dask
run its tasks elsewhere; they rewrite the same chunks, so outputs are neither duplicated
nor missing.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcpath.config import NAME_PATTERN, InferConfig
from hpcpath.errors import HpcpathError, OutputError
from hpcpath.files import read_table, write_table
from hpcpath.infer.outputs import SUMMARY_COLUMNS, TASK_COLUMNS
from hpcpath.infer.tasks import (
    detect_candidates,
    finish_predictions,
    output_paths,
    pack_parts,
    plan_group,
    predict_parts,
)
from hpcpath.stage import Unit, run_per_slide
from hpcpath.store import check_output_dir, slide_source
from hpcpath.store.predictions import open_predictions, predictions_complete

__all__ = ["InferResult", "infer_slides", "check_model", "prediction_name", "SUMMARY_NAME", "TASKS_NAME"]

SUMMARY_NAME = "summary.csv"
TASKS_NAME = "tasks.csv"
RUN_MARKER = "hpcpath-infer.json"


@dataclass
class InferResult:
    out_dir: Path
    name: str
    rows: list[dict[str, Any]]
    summary_path: Path
    tasks_path: Path

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def windows(self) -> int:
        return sum(int(r.get("windows") or 0) for r in self.rows if not r.get("reused"))


def prediction_name(model_dir: str | os.PathLike, name: str | None = None) -> str:
    """``name``, else the name of the dataset the model was trained on (its metadata's
    ``extra.dataset_name``, so ``hpcpath evaluate heatmaps --name tumor`` finds a model
    trained on ``tumor``), else the model folder's name made safe for a Zarr group."""
    if name:
        return name
    from hpcpath.modelio import load_meta

    try:
        trained_on = load_meta(model_dir).extra.get("dataset_name")
    except HpcpathError:
        trained_on = None
    if isinstance(trained_on, str) and re.fullmatch(NAME_PATTERN, trained_on):
        return trained_on
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(model_dir).resolve().name)[:100]
    return base if re.fullmatch(NAME_PATTERN, base) else f"_{base[1:]}" if base else "model"



def _claim_output(out: Path, name: str, model_info: dict) -> None:
    """One output folder holds one prediction name (file names carry only the slide id):
    refuse a folder another name's run wrote, record ours."""
    from hpcpath.files import write_atomic

    marker = out / RUN_MARKER
    if marker.exists():
        try:
            prev = json.loads(marker.read_text()).get("name")
        except ValueError:
            prev = None
        if prev not in (None, name):
            raise OutputError(f"holds the outputs of predictions {prev!r}; use another output "
                              f"folder for {name!r}", out)
    doc = {"format": "hpcpath-infer/1", "name": name, "model": model_info}
    write_atomic(marker, (json.dumps(doc, indent=2) + "\n").encode())


def split_inputs(inputs) -> tuple[list[Path], list[Path], list[tuple[Path, str]]]:
    """(stores, slides, bad inputs with a reason)."""
    from hpcpath.io import discover_slides

    stores, slides, bad = [], [], []
    for raw in inputs:
        p = Path(raw)
        if p.suffix == ".zarr":
            if p.is_dir():
                stores.append(p)
            else:
                bad.append((p, "no such slide store"))
        elif p.is_dir() and any(c.suffix == ".zarr" and c.is_dir() for c in p.iterdir()):
            stores += sorted(c for c in p.iterdir() if c.suffix == ".zarr" and c.is_dir())
        else:
            slides += discover_slides([p])
    return stores, slides, bad



def _with_path(error: str, path: Path) -> str:
    """``error`` if it starts with the file it concerns, else prefixed with ``path``."""
    head = error.split(": ", 1)[0]
    return error if head and (head == str(path) or Path(head).exists()) else f"{path}: {error}"


def _wants_gpu(backend, cfg: InferConfig) -> bool:
    if cfg.gpu != "prefer":
        return cfg.gpu == "require"
    return backend.offers_gpus()


def _row_from_summary(sid: str, store: Path, name: str, info: dict, seconds: float,
                      reused: bool) -> dict[str, Any]:
    s = info.get("summary") or {}
    return {"slide_id": sid, "status": "complete", "reused": reused, "name": name,
            "mode": info.get("mode"), "task": info.get("model", {}).get("task"),
            "seconds": round(seconds, 3), "store": str(store), "error": None,
            **{k: v for k, v in s.items() if k in SUMMARY_COLUMNS}}


def estimate_windows(meta, mmeta, cfg: InferConfig) -> int:
    """About how many windows a store gives (its tile count scaled by the stride ratio): only
    to put small slides together in groups before their plans say exactly."""
    til = meta.tiling
    mpp = meta.mpp
    d = float(mmeta.patch_mpp / mpp) if (mmeta.patch_mpp and mpp) else float(mmeta.patch_downsample or 1.0)
    tile_step = til.stride * til.downsample
    step = (cfg.stride or max(1, round(tile_step / d))) * d
    return max(1, round(til.n_tiles * (tile_step / step) ** 2))


def group_slides(sizes: dict[str, int], budget: int, max_slides: int = 64) -> list[list[str]]:
    """Slides (in order) put together while their windows add up to at most ``budget`` (a
    task's worth, ``windows_per_task``): one plan task, shared prediction tasks with full
    batches, for many small slides; a bigger slide is a group of its own.

    >>> group_slides({"a": 686, "b": 686, "c": 20000, "d": 5}, 8192)
    [['a', 'b'], ['c'], ['d']]
    """
    ids = list(sizes)
    return [[ids[k] for k in unit] for unit in pack_parts(list(sizes.values()), budget, max_slides)]


def check_model(model_dir: str | os.PathLike, cfg: InferConfig):
    """The model's metadata, or a one-line error: no model folder, unreadable metadata,
    missing weights file, or a mode the model cannot do.  No TensorFlow needed."""
    from hpcpath.modelio import MODEL_FILE, load_meta

    model_dir = Path(model_dir)
    meta = load_meta(model_dir)
    if not (model_dir / MODEL_FILE).is_file():
        raise HpcpathError(f"model file missing ({MODEL_FILE})", model_dir)
    if cfg.mode == "two-stage" and meta.task != "points":
        raise HpcpathError(f"two-stage detection needs a points model; this one is "
                           f"{meta.task!r} (use --mode window)", model_dir)
    return meta


def infer_slides(
    inputs: list[str | os.PathLike],
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: InferConfig | None = None,
    *,
    client=None,
    slide_dirs: Sequence[str | os.PathLike] = (),
    failed: Sequence[tuple[str, str]] = (),
    on_event: Callable[[str, dict], None] | None = None,
) -> InferResult:
    """Run the model in ``model_dir`` over slide stores (or folders of them); write to
    ``out_dir``.

    Stores are used where they are and get ``predictions/<name>``; raw slides are tiled
    first by the caller (:func:`hpcpath.workflows.infer_inputs`, ``hpcpath infer``), whose
    failures (``failed``: slide id, one-line error) are recorded like any other.  Per
    slide, ``out_dir`` receives ``<slide_id>.overlay.png`` and, for points models,
    ``<slide_id>.detections.csv`` / ``.geojson``; ``summary.csv`` holds one row per slide,
    ``tasks.csv`` one row per prediction task (where it ran, for how long).
    """
    from hpcpath.infer.model import model_digest
    from hpcpath.stage import as_backend, expect_slides
    from hpcpath.store import open_store

    cfg = cfg or InferConfig()
    backend = as_backend(client)
    out = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    model_dir = Path(model_dir)
    mmeta = check_model(model_dir, cfg)  # a bad model folder stops here, before any work
    digest = model_digest(model_dir)
    check_output_dir(out)
    name = prediction_name(model_dir, cfg.name)
    key = cfg.params_key(digest + name)
    model_info = {"path": str(model_dir.resolve()), "digest": digest,
                  "architecture": mmeta.architecture}
    _claim_output(out, name, model_info)
    summary_path, tasks_path = out / SUMMARY_NAME, out / TASKS_NAME
    table = {r["slide_id"]: r for r in read_table(summary_path)}
    task_rows: list[dict[str, Any]] = [r for r in read_table(tasks_path)]
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any], tasks: list[dict] | None = None) -> None:
        nonlocal task_rows
        rows.append(row)
        table[row["slide_id"]] = row
        write_table(summary_path, [table[k] for k in sorted(table)], SUMMARY_COLUMNS)
        if tasks is not None:
            task_rows = [r for r in task_rows if r["slide_id"] != row["slide_id"]]
            task_rows += [{"slide_id": row["slide_id"], **t,
                           "rows": "-".join(map(str, t.get("rows", []))),
                           "candidates": t.get("candidates")} for t in tasks]
            task_rows.sort(key=lambda r: (r["slide_id"], int(r["task"])))
            write_table(tasks_path, task_rows, TASK_COLUMNS)
        emit("slide", {"row": row})

    def failure(sid: str, error: str, store: Path | str | None = None, seconds: float = 0.0):
        record({"slide_id": sid, "status": "failed", "reused": False, "name": name,
                "mode": cfg.mode, "error": error, "seconds": round(seconds, 3),
                "store": str(store or "")}, tasks=[])

    stores, slides, bad = split_inputs(inputs)
    for sid, error in failed:
        failure(sid, error)
    for p, why in bad:
        failure(p.stem, f"{p}: {why}")
    for p in slides:  # the Python API given a slide: say what to do, as one line
        failure(p.stem, f"{p}: a slide, not a slide store: tile it first (hpcpath tile, or "
                        "hpcpath.workflows.infer_inputs)")
    dirs = [Path(d) for d in slide_dirs]
    todo: dict[str, tuple] = {}  # slide id -> plan_predictions' arguments
    sizes: dict[str, int] = {}
    by_id: dict[str, Path] = {}
    for st in stores:
        try:
            meta = open_store(st).metadata
        except HpcpathError as exc:
            failure(st.stem, str(exc), st)
            continue
        sid = meta.slide_id
        if sid in by_id:
            failure(sid, f"{st}: slide id {sid!r} is also {by_id[sid]}", st)
            continue
        by_id[sid] = st
        src = slide_source(st, meta, dirs)
        paths = output_paths(str(out), sid)
        needed = [paths["overlay"]] + ([paths["csv"], paths["geojson"]] if mmeta.task == "points" else [])
        if predictions_complete(st, name, key) and all(p.exists() for p in needed):
            info = open_predictions(st, name).info
            record(_row_from_summary(sid, st, name, info, 0.0, True),
                   tasks=(info.get("summary") or {}).get("task_records", []))
            continue
        todo[sid] = (str(st), str(src) if src else None, str(model_dir), name, cfg, key, model_info)
        sizes[sid] = estimate_windows(meta, mmeta, cfg)
    emit("start", {"slides": len(todo) + len(rows), "submitted": len(todo)})
    # small slides go in groups: one plan task, prediction tasks filled across slides
    groups = {g[0] if len(g) == 1 else f"{g[0]}+{len(g) - 1}": g
              for g in group_slides(sizes, cfg.windows_per_task)}
    plans: dict[str, tuple[Callable, tuple]] = {
        gid: (plan_group, ([todo[sid] for sid in members],)) for gid, members in groups.items()}
    planned: dict[str, dict[str, dict]] = {}  # group -> slide id -> its plan

    run = f"{key}-{uuid.uuid4().hex[:8]}"  # keys unique per run: never reuse an old result
    expect_slides(backend, len(todo))  # --cluster auto: where the units run, before asking it about GPUs
    gpu = bool(plans) and _wants_gpu(backend, cfg)
    if plans:  # GPUs used, or one line why not (hpcpath.gpu)
        from hpcpath.infer.model import check_workers_gpu

        check_workers_gpu(backend, cfg.gpu)
    def expand(gid: str, plan: dict) -> list:
        """The group's units: prediction tasks over its slides' blocks (window mode: blocks of
        several slides packed into one task up to ``windows_per_task``), then a finishing
        unit per slide after the tasks that hold its blocks."""
        mine = planned[gid] = {}
        parts, owner = [], []
        for sid, p in zip(groups[gid], plan["slides"]):
            mine[sid] = p
            if "error" in p:
                continue
            emit("plan", {"slide_id": sid, "windows": p["n_windows"], "tasks": len(p["blocks"])})
            for k, (r0, r1) in enumerate(p["blocks"]):
                parts.append((p["store"], todo[sid][1], k, r0, r1))
                owner.append((sid, p["block_windows"][k]))
        if cfg.mode == "window":
            packed = pack_parts([n for _, n in owner], cfg.windows_per_task)
            units = [Unit(predict_parts, (tuple(parts[i] for i in idx), str(model_dir), name, cfg),
                          "windows", ("predict", j, run), retries=1, gpu=gpu) for j, idx in enumerate(packed)]
        else:  # two-stage: one task per block, as planned
            packed = [[i] for i in range(len(parts))]
            units = [Unit(detect_candidates, (store, src, str(model_dir), name, k, r0, r1, cfg),
                          "windows", ("predict", k, owner[i][0], run), retries=1, gpu=gpu)
                     for i, (store, src, k, r0, r1) in enumerate(parts)]
        unit_of = {i: j for j, idx in enumerate(packed) for i in idx}
        for sid, p in mine.items():
            if "error" not in p:
                after = sorted({unit_of[i] for i, (s2, _) in enumerate(owner) if s2 == sid})
                units.append(Unit(finish_predictions, (p["store"], name, str(out), cfg), "finish",
                                  ("predict-finish", sid, run), after=tuple(after)))
        return units

    def finish(gid: str, o) -> None:
        """Once per group: each slide's row, from its plan's error, else its predictions'
        completion marker (a failed shared task fails the slides it held, not the others)."""
        mine = planned.get(gid, {})
        for sid in groups[gid]:
            st = by_id[sid]
            p = mine.get(sid)
            err = p["error"] if p and "error" in p else None if p else o.error
            if err is not None:
                failure(sid, _with_path(err, st), st, o.seconds)
                continue
            try:
                info = open_predictions(st, name, require_complete=False).info
            except HpcpathError as exc:
                failure(sid, str(exc), st, o.seconds)
                continue
            if not info.get("complete"):
                failure(sid, _with_path(o.error or "predictions not complete", st), st, o.seconds)
                continue
            record(_row_from_summary(sid, st, name, info, o.seconds, False),
                   tasks=info["summary"].get("task_records", []))

    def on_task(gid: str, kind: str, n: int) -> None:
        if kind == "windows":
            emit("windows", {"slide_id": gid, "n": n})

    run_per_slide(backend, plans, expand, finish, stage="predict", key=run, label=str(out), on_task=on_task)
    return InferResult(out, name, rows, summary_path, tasks_path)

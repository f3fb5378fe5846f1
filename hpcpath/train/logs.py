"""Run logs, written by rank 0 only: ``history.csv`` (one row per epoch, rewritten
atomically), TensorBoard event files under ``tensorboard/`` and a one-line summary per epoch
on stderr.  Per-rank audit logs (``audit/rank-<r>.jsonl``: weight checksum and data digest
after every step) are written by every rank when ``audit`` is on, to check that ranks stay
in sync and read different data.

Always, whatever ``audit`` says: ``ranks.json`` (every rank's host, local rank, CUDA device
and the device that did the work: a GPU's name or CPU) and ``ranks-sync.jsonl`` (one line
per epoch: every rank's checksum of all model weights after the epoch), written by rank 0
from values gathered from every rank; with several ranks each also prints its own line of
both to stderr, so a job log shows hostnames and ranks.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from hpcpath.files import write_json, write_text

__all__ = ["RunLog", "AuditLog", "weights_checksum", "gather_json", "ranks_record", "rank_sync"]


class RunLog:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.out, self.enabled = out, enabled
        self.rows: list[dict] = []
        self._writer: Any = None  # a tf.summary writer when TensorBoard logs are on
        if enabled and tensorboard:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(out / "tensorboard"))

    def restore(self, rows: list[dict]) -> None:
        self.rows = list(rows)
        self._write_csv()

    def epoch(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self._write_csv()
        if self._writer is not None:
            self._scalars(row)
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                 if k in ("epoch", "step", "loss", "val_loss", "val_auc", "val_max_f1", "lr",
                          "samples_per_s")]
        print("hpcpath train: " + ", ".join(parts), file=sys.stderr, flush=True)

    def _write_csv(self) -> None:
        if not self.enabled:
            return
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(self.rows)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text(self.out / "history.csv", buf.getvalue())

    def _scalars(self, row: dict) -> None:
        """TensorBoard scalars with plain TF ops (the tensorboard package is not needed)."""
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        meta = summary_pb2.SummaryMetadata()
        meta.plugin_data.plugin_name = "scalars"
        meta.data_class = summary_pb2.DATA_CLASS_SCALAR
        with self._writer.as_default():
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    tf.summary.write(k, tf.constant(float(v), tf.float32), step=int(row["step"]),
                                     metadata=meta)
        self._writer.flush()


def weights_checksum(variables) -> str:
    h = hashlib.sha1()
    for v in variables:
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:16]


class AuditLog:
    def __init__(self, out: Path, rank: int, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            (out / "audit").mkdir(parents=True, exist_ok=True)
            self._f = open(out / "audit" / f"rank-{rank}.jsonl", "a", buffering=1)

    def write(self, **record) -> None:
        if self.enabled:
            self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._f.close()


def gather_json(engine, obj) -> list:
    """Every rank's JSON-able ``obj``, in rank order, on every rank (two sums and a gather)."""
    import numpy as np

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    counts = np.zeros(engine.size, np.int64)
    counts[engine.rank] = len(raw)
    counts = engine.allreduce_sum(counts).astype(np.int64)
    flat = engine.allgather(raw).astype(np.uint8).tobytes()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [json.loads(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ranks_record(engine, out: Path) -> list[dict]:
    """Who is who: gathered from every rank; rank 0 writes ``ranks.json``."""
    me = {"rank": engine.rank, "size": engine.size, "host": socket.gethostname(),
          "local_rank": engine.local_rank, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
          "device": engine.device, "engine": engine.name, "pid": os.getpid(),
          "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
          "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
    if engine.size > 1:  # a single process says its device in its last line
        print(f"hpcpath train: {engine.describe()}", file=sys.stderr, flush=True)
    ranks = gather_json(engine, me)
    if engine.is_chief:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ranks.json", ranks, indent=1)
    return ranks


def rank_sync(engine, epoch: int, step: int, checksum: str, out: Path) -> list[str]:
    """Every rank's weight checksum after ``epoch`` (rank order); rank 0 appends them to
    ``ranks-sync.jsonl`` and warns when they differ."""
    if engine.size > 1:
        print(f"hpcpath train: epoch {epoch} step {step} rank {engine.rank}/{engine.size} on "
              f"{socket.gethostname()} (local rank {engine.local_rank}): weights {checksum}",
              file=sys.stderr, flush=True)
    sums = gather_json(engine, checksum)
    if engine.is_chief:
        _append_line(out / "ranks-sync.jsonl", {"epoch": epoch, "step": step, "checksums": sums})
        if len(set(sums)) != 1:
            print(f"hpcpath train: warning: ranks' weights differ after epoch {epoch}: {sums}",
                  file=sys.stderr, flush=True)
    return sums

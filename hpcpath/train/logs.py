"""Run logs, written by rank 0 only: ``history.csv`` (one row per epoch, rewritten
atomically), TensorBoard event files under ``tensorboard/`` and a one-line summary per epoch
on stderr.  Per-rank audit logs (``audit/rank-<r>.jsonl``: weight checksum and data digest
after every step) are written by every rank when ``audit`` is on, to check that ranks stay
in sync and read different data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path

__all__ = ["RunLog", "AuditLog", "weights_checksum"]


class RunLog:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool = True) -> None:
        self.out, self.enabled = out, enabled
        self.rows: list[dict] = []
        self._writer = None
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
        tmp = self.out / ".history.csv.tmp"
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.out / "history.csv")

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

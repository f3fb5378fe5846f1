"""Checkpoints: model weights, optimizer state and the loop's own state, written by rank 0.

``OUT/checkpoints/step-000000120/`` holds ``model.weights.h5``, ``optimizer.npz`` (the
optimizer's variables in their build order: step count, moments, learning rate, loss scale)
and ``state.json`` (epoch, step within the epoch, global step, phase, schedule, hard
negatives, history).  A checkpoint is written under a temporary name and renamed into place,
then ``OUT/checkpoints/latest`` names it: a kill at any moment leaves the previous one intact.
Every file is flushed to disk before ``COMPLETE`` (the completion marker) is written, last,
inside the temporary folder; a folder without it is never read.  Only rank 0 calls
:func:`save_checkpoint` (the loop checks ``engine.is_chief``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from hpcpath.errors import HpcpathError

__all__ = ["save_checkpoint", "latest_checkpoint", "restore_checkpoint", "is_complete", "MARKER"]


def save_checkpoint(root: Path, model, optimizer, state: dict, keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state['global_step']:09d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_weights(tmp / "model.weights.h5")
    np.savez(tmp / "optimizer.npz", *[np.asarray(v.numpy()) for v in optimizer.variables])
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_jsonable) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    (tmp / MARKER).write_text(name + "\n")  # the completion marker, last
    _fsync(tmp / MARKER)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ptr = root / ".latest.tmp"
    ptr.write_text(name + "\n")
    _fsync(ptr)
    os.replace(ptr, root / "latest")
    _fsync(root)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


MARKER = "COMPLETE"


def _fsync(path: Path) -> None:
    """Flush a file or folder entry to disk (a node crash must not leave a marker before the data)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file() and (ckpt / "state.json").is_file()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else (pointer lost or naming
    a removed folder) the highest complete ``step-*``; None when there is none."""
    ptr = root / "latest"
    if ptr.is_file():
        d = root / ptr.read_text().strip()
        if is_complete(d):
            return d
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and is_complete(p)), reverse=True)
    return done[0] if done else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise HpcpathError(f"unreadable checkpoint state ({exc})", ckpt) from None


def restore_checkpoint(ckpt: Path, model, optimizer=None) -> None:
    """Weights into ``model`` and, when given, the optimizer's variables (already built)."""
    try:
        model.load_weights(ckpt / "model.weights.h5")
    except Exception as exc:  # noqa: BLE001 - keras raises many types
        raise HpcpathError(f"checkpoint does not match this model ({str(exc).splitlines()[0]})",
                           ckpt) from None
    if optimizer is None:
        return
    with np.load(ckpt / "optimizer.npz") as z:
        values = [z[f"arr_{i}"] for i in range(len(z.files))]
    if len(values) != len(optimizer.variables):
        raise HpcpathError(f"checkpoint holds {len(values)} optimizer variables, the optimizer "
                           f"has {len(optimizer.variables)}", ckpt)
    for v, val in zip(optimizer.variables, values):
        v.assign(val)

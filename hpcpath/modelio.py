"""The saved-model contract between training and inference.

A model directory holds ``model.keras`` (Keras 3 native format) and ``hpcpath-model.json``
with what inference must know to feed it: patch size, the level-0 downsample (or MPP) the
patches were read at, context downsamples (multi-scale inputs), class names, task kind.
Models take uint8 images (B, T, T, 3) and rescale inside (a Rescaling layer), so every
pipeline feeds the same bytes it stores.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpcpath.errors import HpcpathError
from hpcpath.files import atomic_file, write_json

__all__ = ["ModelMeta", "save_model", "load_model", "task_for", "MODEL_FILE", "META_FILE"]

MODEL_FILE = "model.keras"
META_FILE = "hpcpath-model.json"


@dataclass(frozen=True)
class ModelMeta:
    """What a model expects.  ``inputs`` names the Keras inputs in order: "main" and, for
    multi-scale models, "context_<r>" (r = context downsample factor)."""

    patch_size: int
    classes: tuple[str, ...] = ("positive",)
    task: str = "binary"  # "binary" | "multilabel" | "points"
    patch_downsample: float | None = 1.0  # level-0 px per patch px
    patch_mpp: float | None = None  # preferred over patch_downsample when both are known
    context_downsamples: tuple[float, ...] = ()
    inputs: tuple[str, ...] = ("main",)
    architecture: str = ""
    extra: dict = field(default_factory=dict)


def task_for(rule: str | None, n_classes: int) -> str:
    """The model task a dataset's labelling rule implies: a ``points`` dataset (patches
    centred on annotated points, e.g. mitoses) trains a ``points`` model, which inference
    turns into detections; several label columns train ``multilabel``; else ``binary``."""
    if n_classes > 1:
        return "multilabel"
    return "points" if rule == "points" else "binary"


def save_model(model, directory: str | os.PathLike, meta: ModelMeta) -> Path:
    """Write model + metadata atomically enough: the metadata file is written last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_file(d / MODEL_FILE, suffix=".keras") as tmp:  # keras wants the suffix
        model.save(tmp)
    doc = asdict(meta)
    doc["format"] = "hpcpath-model/1"
    write_json(d / META_FILE, doc)
    return d


def load_meta(directory: str | os.PathLike) -> ModelMeta:
    d = Path(directory)
    try:
        doc = json.loads((d / META_FILE).read_text())
    except FileNotFoundError:
        raise HpcpathError(f"not an hpcpath model folder (no {META_FILE})", d) from None
    except ValueError as exc:
        raise HpcpathError(f"unreadable {META_FILE} ({exc})", d) from None
    doc.pop("format", None)
    for k in ("classes", "context_downsamples", "inputs"):
        doc[k] = tuple(doc.get(k, ()))
    return ModelMeta(**doc)


def load_model(directory: str | os.PathLike, *, compile: bool = False):
    """(keras model, ModelMeta) from a model folder; clear errors for missing/corrupt files.
    Nothing in the folder is executed: Keras safe mode refuses Lambda layers' bytecode."""
    meta = load_meta(directory)
    path = Path(directory) / MODEL_FILE
    if not path.exists():
        raise HpcpathError(f"model file missing ({MODEL_FILE})", Path(directory))
    import keras

    try:
        # safe_mode: a Lambda layer (pickled Python bytecode) in the file is refused, never run
        model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - keras raises many types for bad files
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise HpcpathError(f"cannot load model ({type(exc).__name__}: {first})", path) from None
    return model, meta

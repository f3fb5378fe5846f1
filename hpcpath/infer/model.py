"""The model on a worker: loaded once per process, reused by every task that runs there.

TensorFlow is configured before its first use in the process: it sees only the GPUs of
``CUDA_VISIBLE_DEVICES`` (set by Slurm for the job, narrowed per worker process by
``hpcpath.cluster.dask_setup``), with memory growth on, so two workers never fight over one
device's memory.  Prediction goes through one traced function per model and batch size; the
last, short batch of a task is padded, so every window is predicted in a batch of the same
shape whichever worker runs it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.errors import HpcpathError
from hpcpath.modelio import META_FILE, MODEL_FILE, ModelMeta

__all__ = ["LoadedModel", "cached_model", "configure_tensorflow", "device_record", "model_digest",
           "check_worker_gpu", "check_workers_gpu", "with_dtype_policy"]

_LOCK = threading.Lock()
_CACHE: dict[tuple, LoadedModel] = {}
_TF_READY: list[str] | None = None
_DEVICE: str | None = None  # what does this worker's work: "GPU <name>" or "CPU" (hpcpath.gpu)


def configure_tensorflow() -> list[str]:
    """Once per process: quiet C++ logs, memory growth on every visible GPU.  Returns the
    names of the GPUs TensorFlow sees (empty on CPU-only machines)."""
    global _TF_READY
    if _TF_READY is not None:
        return _TF_READY
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):  # already initialised by someone else: keep going
            pass
    _TF_READY = [g.name for g in gpus]
    return _TF_READY


def check_worker_gpu(setting: str) -> dict[str, Any]:
    """On a worker, before its first prediction: the ``gpu`` setting (:mod:`hpcpath.gpu`)
    applied to what this worker was given and what TensorFlow sees.  Returns the decision
    (action, device, message) for the driver, which fails the run in one line (``require``)
    or prints the warning (``prefer``) once.  ``off`` hides the GPUs from TensorFlow when it
    has not started in this process yet."""
    global _DEVICE
    import socket

    from hpcpath.gpu import decide, gpu_facts, hide_gpus_if_off, task_gpu

    if _TF_READY is None:
        hide_gpus_if_off(setting)
    configure_tensorflow()
    env = dict(os.environ)
    given = task_gpu()
    if given is not None and not env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = given  # given by the scheduler (Spark), not Slurm
    d = decide(setting, gpu_facts(env))
    _DEVICE = d.device
    return {"action": d.action, "device": d.device, "message": d.message, "host": socket.gethostname()}


def check_workers_gpu(backend, setting: str) -> list[dict[str, Any]]:
    """On the driver: :func:`check_worker_gpu` where the backend's prediction units run
    (every Dask worker, every Spark task slot); a ``require`` failure becomes one ConfigError
    for the whole run (the first worker's reason), ``prefer`` warnings are printed once each
    with the number of workers they concern."""
    import sys

    from hpcpath.errors import ConfigError

    results = backend.on_each_slot(check_worker_gpu, setting)
    for r in results:
        if r["action"] == "fail":
            raise ConfigError(f"worker on {r['host']}: {r['message']}")
    for msg in sorted({r["message"] for r in results if r["action"] == "warn"}):
        n = sum(r["message"] == msg for r in results)
        print(f"hpcpath: warning: {n} worker(s): {msg}", file=sys.stderr, flush=True)
    return results


def _device() -> str:
    global _DEVICE
    if _DEVICE is None:  # no check ran in this process: what TensorFlow sees
        from hpcpath.gpu import decide, gpu_facts

        _DEVICE = decide("prefer", gpu_facts()).device
    return _DEVICE


def device_record() -> dict[str, Any]:
    """Where this task runs: the GPU Slurm (or Spark: ``gpu_address``) gave it, the Dask
    worker, host, Slurm job, process, and when the task ended (``ended``, Unix seconds)."""
    import socket
    import sys
    import time

    from hpcpath.gpu import task_gpu

    dask_worker = getattr(sys.modules.get("distributed"), "get_worker", None)  # on a Dask worker
    try:
        worker = str(dask_worker().name) if dask_worker else ""
    except ValueError:
        worker = ""
    return {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "tf_gpus": len(_TF_READY or []),
        "device": _device() if _TF_READY is not None else "",
        "worker": worker,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "gpu_address": task_gpu() or "",
        "pid": os.getpid(),
        "ended": round(time.time(), 3),
    }


def model_digest(directory: str | os.PathLike) -> str:
    """Content digest of a model folder (weights and metadata): outputs made with another
    model never pass for this one's."""
    import hashlib

    d = Path(directory)
    h = hashlib.sha256()
    for name in (MODEL_FILE, META_FILE):
        try:
            with open(d / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            raise HpcpathError(f"not an hpcpath model folder (no {name})", d) from None
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A Keras model, what it expects, and a batch predictor returning (B, C) float32."""

    model: Any
    meta: ModelMeta
    path: str
    n_outputs: int
    _fns: dict
    device: str | None = None  # TensorFlow device it was loaded on and predicts on

    @property
    def classes(self) -> tuple[str, ...]:
        """One name per output channel: the model folder's class names, or ``output_<i>``
        when their count does not match the outputs (inference and ``hpcpath serve`` agree)."""
        names = tuple(self.meta.classes)
        return names if len(names) == self.n_outputs else tuple(f"output_{i}" for i in range(self.n_outputs))

    def predict(self, inputs: dict[str, np.ndarray] | np.ndarray, batch_size: int,
                tta: bool = False, *, xla: bool = False, mixed: bool = False) -> np.ndarray:
        """Scores for one batch (``len <= batch_size``), padded to ``batch_size`` so the
        traced function always sees one shape.  With ``tta`` the 8 dihedral transforms of
        every input are predicted and averaged.  ``xla``: the forward pass compiled with XLA;
        ``mixed``: float16 compute (a mixed_float16 copy of the model) where TensorFlow sees a
        GPU -- on the CPU it stays float32, where float16 is slower, not faster."""
        from hpcpath.detect import DIHEDRAL, dihedral

        feeds = inputs if isinstance(inputs, dict) else {"main": inputs}
        n = len(next(iter(feeds.values())))
        if n == 0:
            return np.zeros((0, self.n_outputs), np.float32)
        padded = {k: _pad(v, batch_size) for k, v in feeds.items()}
        fn = self._fn(batch_size, xla, mixed and bool(_TF_READY))
        if not tta:
            return self._call(fn, padded)[:n]
        acc = np.zeros((batch_size, self.n_outputs), np.float64)
        for k in DIHEDRAL:
            acc += self._call(fn, {name: np.ascontiguousarray(dihedral(v, k)) for name, v in padded.items()})
        return (acc / len(DIHEDRAL)).astype(np.float32)[:n]

    def _call(self, fn, feeds: dict[str, np.ndarray]) -> np.ndarray:
        import contextlib

        args = [feeds[name] for name in self.meta.inputs]
        with _on_device(self.device) if self.device else contextlib.nullcontext():
            out = fn(args[0] if len(args) == 1 else args)
        out = np.asarray(out, np.float32)
        return out.reshape(out.shape[0], -1)

    def _fn(self, batch_size: int, xla: bool = False, mixed: bool = False):
        fn = self._fns.get((batch_size, xla, mixed))
        if fn is None:
            import tensorflow as tf

            model = self.model
            if mixed:
                model = self._fns.get("mixed") or with_dtype_policy(self.model, "mixed_float16")
                self._fns["mixed"] = model
            fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True, jit_compile=xla)
            self._fns[(batch_size, xla, mixed)] = fn
        return fn


def with_dtype_policy(model, policy: str):
    """A copy of ``model`` whose layers compute in ``policy`` (e.g. ``mixed_float16``: float16
    math, float32 weights), same weights.  A saved model keeps the policy it was built with,
    so mixed-precision inference needs this copy."""
    import keras

    def clone(layer):
        cfg = layer.get_config()
        if "dtype" in cfg and not isinstance(layer, keras.layers.InputLayer):
            cfg["dtype"] = policy
        return layer.__class__.from_config(cfg)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    if len(a) == n:
        return a
    out = np.zeros((n, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


def _on_device(device: str):
    import tensorflow as tf

    return tf.device(device)


def cached_model(directory: str | os.PathLike) -> LoadedModel:
    """The model of ``directory``, loaded on first use in this process and kept.

    The cache key holds the folder's real path, the task's GPU (:func:`hpcpath.gpu.tf_device`:
    a Spark Python worker runs tasks given different GPUs, and keeps one copy per GPU it was
    given) and its files' modification times, so a model saved anew under the same path is
    loaded again.  Thread-safe.
    """
    import contextlib

    from hpcpath.gpu import tf_device
    from hpcpath.modelio import load_model

    d = Path(directory).resolve()
    device = tf_device()
    try:
        key = (str(d), device, *((d / f).stat().st_mtime_ns for f in (MODEL_FILE, META_FILE)))
    except FileNotFoundError:
        key = (str(d), device)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        configure_tensorflow()
        with _on_device(device) if device else contextlib.nullcontext():
            model, meta = load_model(d)
        shape = model.output_shape
        shape = shape[0] if isinstance(shape, list) else shape
        n_out = int(np.prod([s for s in shape[1:] if s is not None])) if len(shape) > 1 else 1
        if meta.inputs and len(meta.inputs) != len(model.inputs):
            raise HpcpathError(
                f"model has {len(model.inputs)} inputs but {META_FILE} names {len(meta.inputs)} "
                f"({', '.join(meta.inputs)})", d)
        loaded = LoadedModel(model, meta, str(d), n_out, {}, device)
        for k in [k for k in _CACHE if k[:2] == (str(d), device)]:
            del _CACHE[k]  # an older version of this folder's model
        _CACHE[key] = loaded
        return loaded

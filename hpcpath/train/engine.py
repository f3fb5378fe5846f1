"""Engines: how one training process learns who it is and talks to the others.

The training loop (``loop.py``) is written once against :class:`Engine`; an engine only
supplies what truly differs between one process, Horovod ranks and tf.distribute workers:

* ``start()``: join the group, pin this process's GPU;
* ``scope()``: where variables must be created (tf.distribute's strategy scope);
* ``run(fn, *args)``: call the per-replica step (``strategy.run`` for tf.distribute);
* ``reduce_gradients(grads)``: Horovod's grouped allreduce; identity elsewhere (the single
  process has nothing to reduce; tf.distribute's optimizer sums across replicas itself);
* ``loss_replicas``: the number the local mean loss is divided by before the gradient, so
  the optimizer's update is the mean over the global batch under every engine;
* ``broadcast(variables)``: rank 0's values everywhere (start, resume);
* ``allreduce_sum(array)``: host-side sum for metrics, counts and gathered predictions.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from hpcpath.errors import ConfigError

__all__ = ["Engine", "SingleEngine", "make_engine", "pin_gpu_env", "local_rank_from_env", "check_device"]


def local_rank_from_env() -> int:
    """This process's rank on its node, from whichever launcher started it."""
    for key in ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK",
                "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def pin_gpu_env(local_rank: int) -> str | None:
    """One GPU per process, chosen by local rank: narrow ``CUDA_VISIBLE_DEVICES`` to the
    ``local_rank``-th visible device before TensorFlow initialises CUDA.  A job step that
    already sees a single device keeps it.  Returns the device id now visible (None: none)."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible or visible == ["-1"] or visible == ["NoDevFiles"]:
        return None
    chosen = visible[local_rank % len(visible)]
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


def check_device(setting: str, local_rank: int) -> str:
    """The ``gpu`` setting applied to this process (:mod:`hpcpath.gpu`) after pinning: the
    device that will do the work, a warning (local rank 0 only: once per node) or a one-line
    ConfigError.  ``off`` hides the GPUs first, so call it before TensorFlow starts."""
    from hpcpath.gpu import check_gpus, decide, gpu_facts, hide_gpus_if_off

    hide_gpus_if_off(setting)
    facts = gpu_facts()
    decision = decide(setting, facts)
    if local_rank != 0 and decision.action == "warn":
        return decision.device
    return check_gpus(setting, facts, who="hpcpath train")


class Engine:
    """One process (also the base class)."""

    name = "single"
    rank = 0
    size = 1
    local_rank = 0
    loss_replicas = 1
    gpu: str | None = None  # the CUDA device id this process was pinned to
    device: str = "CPU"  # what does the work: "GPU <name>" or "CPU" (hpcpath.gpu)
    gpu_setting: str = "prefer"

    def __init__(self, gpu_setting: str = "prefer") -> None:
        self.gpu_setting = gpu_setting

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def start(self) -> Engine:
        self.gpu = pin_gpu_env(self.local_rank)
        self.device = check_device(self.gpu_setting, self.local_rank)
        _gpu_memory_growth()
        return self

    def scope(self):
        return contextlib.nullcontext()

    def run(self, fn, *args):
        return fn(*args)

    def reduce_gradients(self, grads):
        return grads

    def broadcast(self, variables) -> None:
        pass

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array)

    def average_variables(self, variables) -> None:
        """Make non-trainable state (BatchNorm moving statistics) the rank mean."""

    # ------------------------------------------------------------ shared helpers
    def allreduce_mean(self, array) -> np.ndarray:
        return self.allreduce_sum(np.asarray(array, np.float64)) / self.size

    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Concatenate every rank's rows, in rank order, via two sums (works with any
        engine that can sum; ranks may hold different numbers of rows)."""
        array = np.asarray(array)
        counts = np.zeros(self.size, np.int64)
        counts[self.rank] = len(array)
        counts = self.allreduce_sum(counts).astype(np.int64)
        out = np.zeros((int(counts.sum()), *array.shape[1:]), np.float64)
        start = int(counts[: self.rank].sum())
        out[start : start + len(array)] = array
        return self.allreduce_sum(out).astype(array.dtype if array.dtype != bool else np.float64)

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        import socket

        gpu = f", CUDA device {self.gpu}" if self.gpu is not None else ""
        return (f"{self.name} rank {self.rank}/{self.size} on {socket.gethostname()} "
                f"(local rank {self.local_rank}{gpu}): {self.device}")


class SingleEngine(Engine):
    pass


def share_cpus(local_size: int) -> None:
    """CPU-only ranks split the node's cores: ``cores / ranks on this node`` threads each for
    TensorFlow's op pools (measured on 2 cores: two ranks of 2 threads each ran at half the
    speed of one process; one thread each runs at full speed).  Must run before TensorFlow
    executes its first op; a later call is ignored."""
    import tensorflow as tf

    if local_size <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_size)
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _gpu_memory_growth() -> None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)


def make_engine(name: str, gpu: str = "prefer") -> Engine:
    """The engine named in the config (``single``, ``horovod``, ``tf-distribute``), started;
    ``gpu`` is the config's ``gpu`` setting (require, prefer, off)."""
    if name == "single":
        return SingleEngine(gpu).start()
    if name == "horovod":
        from hpcpath.train.horovod import HorovodEngine

        return HorovodEngine(gpu).start()
    if name == "tf-distribute":
        from hpcpath.train.tfdist import TFDistributeEngine

        return TFDistributeEngine(gpu).start()
    raise ConfigError(f"engine: unknown engine {name!r}; use single, horovod or tf-distribute")

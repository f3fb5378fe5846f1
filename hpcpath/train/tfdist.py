"""The tf.distribute engine: ``MultiWorkerMirroredStrategy`` for sites without Horovod.

Under ``srun`` the group is the job's tasks laid out as ``SlurmClusterResolver`` would, but
at the addresses Slurm has for the nodes (:func:`slurm_resolver`; no nvidia-smi call; this
engine pins the GPU itself, by local rank, like Horovod).
Elsewhere ``TF_CONFIG`` (or nothing: one worker).  Keras 3 ``model.fit`` fails under this
strategy (GUIDE section 2), so the shared custom step runs through ``strategy.run``; the
optimizer sums gradients across replicas, hence ``loss_replicas`` = number of replicas.
"""

from __future__ import annotations

import os

import numpy as np

from hpcpath.errors import ConfigError
from hpcpath.train.engine import Engine, _gpu_memory_growth, check_device, local_rank_from_env, pin_gpu_env, share_cpus

__all__ = ["TFDistributeEngine", "slurm_resolver", "worker_addresses"]


def _slurm_tasks() -> int:
    for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def worker_addresses(hosts: list[str], counts: list[int], addrs: dict[str, str], base: int) -> list[str]:
    """``ADDR:PORT`` of every task in ``SLURM_PROCID`` order (block layout, as
    SlurmClusterResolver numbers them): the k-th task of a node listens on ``base + k``.

    >>> worker_addresses(["n1", "n2"], [2, 2], {"n1": "10.0.0.1", "n2": "10.0.0.2"}, 21000)
    ['10.0.0.1:21000', '10.0.0.1:21001', '10.0.0.2:21000', '10.0.0.2:21001']
    """
    return [f"{addrs[h]}:{base + k}" for h, n in zip(hosts, counts) for k in range(n)]


def slurm_resolver():
    """The job's workers at the addresses other nodes dial (Slurm's ``NodeAddr`` of each
    node, checked: :func:`hpcpath.train.launch.node_addresses`) -- SlurmClusterResolver would
    use bare host names -- with ports derived from the job id so concurrent jobs on one node
    do not collide (``HPCPATH_TF_PORT_BASE`` to override).  Never runs nvidia-smi."""
    import tensorflow as tf

    from hpcpath.train.launch import _hostnames, _tasks_per_node, node_addresses

    hosts = _hostnames()
    counts = _tasks_per_node(len(hosts))
    job = int(os.environ.get("SLURM_JOB_ID", "0") or 0)
    base = int(os.environ.get("HPCPATH_TF_PORT_BASE", 20000 + (job * 37) % 20000))
    workers = worker_addresses(hosts, counts, node_addresses(hosts), base)
    spec = tf.train.ClusterSpec({"worker": workers})
    if os.environ["SLURM_PROCID"] == "0":
        import sys

        print(f"hpcpath train: tf.distribute: {len(workers)} workers on {len(hosts)} node(s) at "
              + ", ".join(workers), file=sys.stderr, flush=True)
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type="worker", task_id=int(os.environ["SLURM_PROCID"]), rpc_layer="grpc")


class TFDistributeEngine(Engine):
    name = "tf-distribute"

    def start(self) -> TFDistributeEngine:
        self.gpu = pin_gpu_env(local_rank_from_env())
        self.device = check_device(self.gpu_setting, local_rank_from_env())
        import tensorflow as tf

        local_size = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
        share_cpus(int(local_size) if local_size.isdigit() else 1)
        _gpu_memory_growth()
        resolver = slurm_resolver() if "SLURM_PROCID" in os.environ and _slurm_tasks() > 1 else None
        try:
            self.strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"engine tf-distribute: cannot form the worker group ({exc})") from None
        ext = self.strategy.extended
        local = len(ext.worker_devices)
        if local != 1:
            raise ConfigError(f"engine tf-distribute: {local} devices in one task; run one task "
                              "per GPU (srun --ntasks-per-node=GPUS)")
        self.size = self.strategy.num_replicas_in_sync
        self.rank = int(self.strategy.cluster_resolver.task_id or 0) if self.size > 1 else 0
        self.local_rank = local_rank_from_env()
        self.loss_replicas = self.size
        return self

    def scope(self):
        return self.strategy.scope()

    def average_variables(self, variables) -> None:
        """BatchNorm's moving statistics are updated by each worker from its own batches and
        drift apart (seen: four different weight checksums after an epoch); make them the
        worker mean, as the Horovod engine does."""
        if self.size == 1:
            return
        for v in variables:
            if str(v.dtype) in ("float16", "float32", "float64", "bfloat16"):
                mean = self.allreduce_sum(np.asarray(v.numpy(), np.float64)) / self.size
                v.assign(mean.astype(np.asarray(v.numpy()).dtype))

    def run(self, fn, *args):
        import tensorflow as tf

        out = self.strategy.run(fn, args=args)
        return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0], out)

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        a = np.asarray(array)
        dt = tf.float64 if a.dtype.kind == "f" or a.dtype == bool else tf.int64
        if self.size == 1:
            return a.astype(dt.as_numpy_dtype)
        value = tf.constant(a, dtype=dt)
        per = self.strategy.run(lambda: tf.identity(value))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per, axis=None).numpy()

"""The Horovod engine: one process per GPU, gradients averaged by a grouped allreduce.

Keras 3 breaks Horovod's own Keras layer, ``DistributedGradientTape`` and
``broadcast_variables`` (``'Variable' object has no attribute 'ref'``, horovod#4290), so, as
recorded in ../shared/GUIDE.md section 2, the loop computes gradients with a plain
``tf.GradientTape``, averages them with ``hvd.grouped_allreduce(op=hvd.Average)`` and
broadcasts each ``model.variables`` value with ``v.assign(hvd.broadcast(v.value, 0))``.

Launched by ``horovodrun``, ``mpirun``, or ``srun`` (MPI build with ``--mpi=pmix``, or the
Gloo rendezvous that :mod:`hpcpath.train.launch` starts inside an sbatch job).
"""

from __future__ import annotations

import numpy as np

from hpcpath.errors import ConfigError
from hpcpath.train.engine import Engine, _gpu_memory_growth, check_device, local_rank_from_env, pin_gpu_env, share_cpus

__all__ = ["HorovodEngine"]


class HorovodEngine(Engine):
    name = "horovod"

    def start(self) -> HorovodEngine:
        from hpcpath.train.launch import slurm_task_env

        slurm_task_env()  # srun-launched Gloo ranks: HOROVOD_* from SLURM_* (no-op otherwise)
        self.gpu = pin_gpu_env(local_rank_from_env())  # before TensorFlow sees CUDA
        self.device = check_device(self.gpu_setting, local_rank_from_env())  # before hvd.init: no hang
        try:
            import horovod.tensorflow as hvd
        except ImportError as exc:
            raise ConfigError(f"engine horovod: Horovod is not installed or broken ({exc}); "
                              "build it with bin/build-horovod") from None
        hvd.init()
        self.hvd = hvd
        self.rank, self.size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        share_cpus(hvd.local_size())
        _gpu_memory_growth()
        self._n = 0
        return self

    def reduce_gradients(self, grads):
        return self.hvd.grouped_allreduce(list(grads), op=self.hvd.Average)

    def broadcast(self, variables) -> None:
        for v in variables:
            v.assign(self.hvd.broadcast(v.value, 0, name=self._name("bcast")))

    def allreduce_sum(self, array: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        a = np.asarray(array)
        dt = np.float64 if a.dtype.kind == "f" or a.dtype == bool else np.int64
        out = self.hvd.allreduce(tf.constant(a.astype(dt)), op=self.hvd.Sum, name=self._name("sum"))
        return out.numpy()

    def average_variables(self, variables) -> None:
        for v in variables:
            if v.dtype in ("float16", "float32", "float64", "bfloat16"):
                v.assign(self.hvd.allreduce(v.value, op=self.hvd.Average, name=self._name("avg")))

    def _name(self, kind: str) -> str:
        """Collective names must match across ranks: every rank calls these in one order."""
        self._n += 1
        return f"hpcpath.{kind}.{self._n}"

    def shutdown(self) -> None:
        self.hvd.shutdown()

"""Local workers pinned to their own cores, with thread pools sized to them.

On one node a LocalCluster worker is meant to be a core's worth of work: without pinning,
its Zarr writer thread, Blosc and BLAS pools spill onto the other workers' cores, so one
worker already uses more than one core and a second worker scales poorly.  Each worker
process gets ``cores_per_worker`` cores of its own (``os.sched_setaffinity`` on every thread
of the process, set by the worker preload :func:`dask_setup` before any task runs; a worker
the nanny restarts is pinned again), and BLAS / OpenMP / Blosc / Zarr / TensorFlow pools are
sized to those cores through the environment.  Slurm binds its own jobs; this is for
``LocalCluster`` only.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CORES_VAR", "available_cores", "core_sets", "dask_setup", "pin_process", "thread_env"]

CORES_VAR = "HPCPATH_WORKER_CORES"
"""Core sets of the cluster's workers, ``0,1;2,3``: worker ``i`` takes set ``i`` (mod count)."""


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask; all cores where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_sets(cores: list[int], n_workers: int, per_worker: int | None = None) -> list[list[int]]:
    """Disjoint core sets, one per worker: the cores split evenly (the first workers take one
    more where they do not divide), or ``per_worker`` each.  With more workers than cores,
    workers share cores round-robin (each still one core).

    >>> core_sets([0, 1], 2), core_sets([0, 1], 1), core_sets([0, 1], 1, 1)
    ([[0], [1]], [[0, 1]], [[0]])
    >>> core_sets([0, 1, 2, 3, 4], 2), core_sets([0, 1], 3)
    ([[0, 1, 2], [3, 4]], [[0], [1], [0]])
    """
    if n_workers < 1 or not cores:
        raise ValueError("need at least one worker and one core")
    if n_workers > len(cores):
        return [[cores[i % len(cores)]] for i in range(n_workers)]
    if per_worker is None:
        base, extra = divmod(len(cores), n_workers)
        sizes = [base + (i < extra) for i in range(n_workers)]
    else:
        sizes = [min(per_worker, len(cores) // n_workers)] * n_workers
    out, start = [], 0
    for size in sizes:
        out.append(cores[start:start + size])
        start += size
    return out


def thread_env(n_cores: int) -> dict[str, str]:
    """Environment that sizes a worker's thread pools to ``n_cores``: BLAS/OpenMP, Blosc,
    Zarr's codec threads and TensorFlow's intra-/inter-op pools (read when they start)."""
    n = str(max(1, n_cores))
    return {
        "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
        "BLOSC_NTHREADS": n, "NUMEXPR_MAX_THREADS": n, "ZARR_THREADING__MAX_WORKERS": n,
        "TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": "1" if n_cores <= 2 else "2",
    }


def pin_process(cores: list[int]) -> None:
    """Pin every thread of this process (and the threads it starts later) to ``cores``.

    ``sched_setaffinity(0, ...)`` binds only the calling thread on Linux: the event loop and
    executor threads a worker already runs are bound one by one through /proc/self/task."""
    mask = set(cores)
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, mask)
        except (ProcessLookupError, PermissionError):  # a thread that just ended
            pass


def dask_setup(worker: Any) -> None:
    """Worker preload (``LocalCluster(preload=["hpcpath.cluster.pinning"])``): pin this worker
    to its core set from ``$HPCPATH_WORKER_CORES`` (LocalCluster names workers 0, 1, ...)."""
    text = os.environ.get(CORES_VAR, "")
    sets = [[int(c) for c in part.split(",") if c] for part in text.split(";") if part]
    if not sets or not hasattr(os, "sched_setaffinity"):
        return
    try:
        index = int(str(worker.name).rpartition("-")[2])
    except ValueError:
        return
    cores = sets[index % len(sets)]
    pin_process(cores)
    for key, value in thread_env(len(cores)).items():
        os.environ[key] = value

"""The local backend: a ``distributed.LocalCluster`` of worker processes, bound to 127.0.0.1,
each pinned to its own cores (:mod:`hpcpath.cluster.pinning`) unless ``pin_workers: false``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hpcpath.cluster.slurm import _one_line
from hpcpath.cluster.spec import LocalSpec
from hpcpath.errors import ConfigError

if TYPE_CHECKING:
    from distributed.deploy import Cluster

__all__ = ["local_cluster", "worker_pinning"]


def worker_pinning(spec: LocalSpec, n_workers: int) -> dict:
    """LocalCluster keyword arguments that pin each worker to its own cores and size its
    thread pools to them (empty when ``pin_workers`` is off or affinity is not supported).

    The pinning preload is added to the worker preloads the Dask config names
    (``distributed.worker.preload``): LocalCluster's ``preload`` argument replaces them."""
    import os

    import dask

    from hpcpath.cluster.pinning import CORES_VAR, available_cores, core_sets, thread_env

    if not spec.pin_workers or not hasattr(os, "sched_setaffinity"):
        return {}
    sets = core_sets(available_cores(), n_workers, spec.cores_per_worker)
    env = thread_env(max(1, min(len(s) for s in sets) // spec.threads_per_worker))
    env[CORES_VAR] = ";".join(",".join(map(str, s)) for s in sets)
    configured = dask.config.get("distributed.worker.preload", None) or []
    preload = [configured] if isinstance(configured, str) else list(configured)
    return {"preload": [*preload, "hpcpath.cluster.pinning"], "env": env}


def local_cluster(spec: LocalSpec, n_workers: int | None) -> Cluster:
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    from hpcpath.cluster.tls import cluster_security

    security = cluster_security(spec)
    n = n_workers or spec.n_workers or CPU_COUNT
    try:
        return LocalCluster(
            n_workers=n,
            **worker_pinning(spec, n),
            **({"security": security, "protocol": "tls://"} if security else {}),
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=spec.memory_limit,
            host="127.0.0.1",
            dashboard_address=spec.dashboard_address,
            silence_logs=logging.WARNING,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"local cluster: {_one_line(exc)}") from exc

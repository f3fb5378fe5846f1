"""The local backend: a ``distributed.LocalCluster`` of worker processes, bound to 127.0.0.1,
each pinned to its own cores (:mod:`hpcpath.cluster.pinning`) unless ``pin_workers: false``,
each started with one malloc arena (:data:`hpcpath._malloc.WORKER_ENV`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from hpcpath.cluster.slurm import _one_line
from hpcpath.cluster.spec import LocalSpec
from hpcpath.errors import ConfigError

if TYPE_CHECKING:
    from distributed.deploy import Cluster

__all__ = ["local_cluster", "worker_pinning", "worker_spawn_env"]


@contextmanager
def worker_spawn_env() -> Iterator[None]:
    """Worker processes started inside get :data:`~hpcpath._malloc.WORKER_ENV` when they
    start (glibc reads it before any Python runs, so it must be there at the spawn).

    Dask's nanny sets ``distributed.nanny.pre-spawn-environ`` in this process's environment
    before each spawn and leaves it there; what it set here is undone on the way out, so
    the calling process and what it starts later keep their own malloc.  Names set in that
    Dask config win over ours (``MALLOC_ARENA_MAX: 8`` restores glibc's arenas)."""
    import dask

    from hpcpath._malloc import WORKER_ENV

    configured = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {**WORKER_ENV, **configured}}):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_pinning(spec: LocalSpec, n_workers: int) -> dict:
    """LocalCluster keyword arguments that pin each worker to its own cores and size its
    thread pools to them (empty when ``pin_workers`` is off or affinity is not supported).

    The pinning preload is added to the worker preloads the Dask config names
    (``distributed.worker.preload``): LocalCluster's ``preload`` argument replaces them."""
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
        with worker_spawn_env():
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

"""The local backend: a ``distributed.LocalCluster`` of worker processes, bound to 127.0.0.1."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from hpcpath.cluster.slurm import _one_line
from hpcpath.cluster.spec import LocalSpec
from hpcpath.errors import ConfigError

if TYPE_CHECKING:
    from distributed.deploy import Cluster

__all__ = ["local_cluster"]


def local_cluster(spec: LocalSpec, n_workers: int | None) -> Cluster:
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    from hpcpath.cluster.tls import cluster_security

    security = cluster_security(spec)
    try:
        return LocalCluster(
            n_workers=n_workers or spec.n_workers or CPU_COUNT,
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

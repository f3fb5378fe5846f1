"""``cluster_client``: start the cluster a spec describes (or connect to a running
scheduler), wait for a first worker and say why none came, and yield a client."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from hpcpath.cluster.local import local_cluster
from hpcpath.cluster.slurm import _one_line, slurm_cluster, slurm_job_states
from hpcpath.cluster.spec import ClusterSpec, LocalSpec, SchedulerSpec, SlurmSpec, parse_cluster_spec
from hpcpath.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client
    from distributed.deploy import Cluster

__all__ = ["cluster_client", "dashboard_link"]

logger = logging.getLogger(__name__)


def _expects_workers(spec: ClusterSpec, n_workers: int | None) -> bool:
    return not (
        isinstance(spec, SlurmSpec)
        and n_workers is None
        and spec.adaptive_max is not None
        and not spec.adaptive_min
    )


_DASHBOARD_HOSTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


@contextmanager
def cluster_client(
    spec: ClusterSpec | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    n_workers_override: int | None = None,
    verbose: bool = False,
) -> Iterator[Client]:
    """Start the cluster that ``spec`` describes, yield a client, close both on exit.

    ``spec`` goes through :func:`parse_cluster_spec` (None: ``$HPCPATH_CLUSTER``, else local).
    ``n_workers_override`` (e.g. a CLI ``--workers``) replaces the worker count: local
    workers, or Slurm workers (rounded up to whole jobs; adaptive scaling is then off); it
    cannot resize an external scheduler and is ignored there.  Waits up to
    ``spec.worker_timeout`` seconds for a first worker (not for adaptive Slurm with
    ``adaptive_min`` 0, which starts workers only once there is work) and raises
    :class:`ClusterError` saying why none came: Slurm jobs still pending (with squeue's
    reason), or ended (see their logs).  Dask's INFO chatter is held back to warnings in
    this process while the context is open, unless ``verbose``.
    """
    from distributed import Client

    spec = parse_cluster_spec(spec)
    if spec.backend == "spark":
        raise ConfigError("a Spark cluster runs hpcpath tile, dataset build and infer; this "
                          "needs Dask (--cluster local, slurm, tcp://... or a Dask YAML spec)")
    if n_workers_override is not None and n_workers_override < 1:
        raise ConfigError(f"the number of workers must be at least 1, got {n_workers_override}")
    with ExitStack() as stack:
        if not verbose:
            stack.enter_context(_quiet_logs("distributed", "dask_jobqueue"))
            # The dashboard's web server runs in this process for local and Slurm clusters; a
            # browser tab closed mid-handshake must not print a traceback into the run.
            stack.enter_context(_quiet_logs("tornado.application", "bokeh", level=logging.CRITICAL))
            # A lost scheduler is said in one line by the stage loop; the client's own
            # reconnect failure and its close-time tracebacks are not for the terminal.
            stack.enter_context(_quiet_logs("distributed.client", level=logging.CRITICAL))
            stack.enter_context(_filtered(_ExpectedWorkerLoss(), "distributed.scheduler",
                                          "distributed.active_memory_manager"))
        cluster: Cluster | None = None
        target: str = spec.backend
        if not verbose:  # unwound after the cluster closed: see _quiet_shutdown
            nanny = logging.getLogger("distributed.nanny")
            stack.callback(nanny.setLevel, nanny.level)
        if isinstance(spec, LocalSpec):
            cluster = stack.enter_context(local_cluster(spec, n_workers_override))
        elif isinstance(spec, SlurmSpec):
            cluster = stack.enter_context(slurm_cluster(spec, n_workers_override))
        else:
            target = spec.address
            if n_workers_override is not None:
                logger.warning(
                    "ignoring n_workers_override=%d: cannot scale %s", n_workers_override, target
                )
        if cluster is not None and not verbose:
            stack.callback(_quiet_shutdown)
        try:
            if cluster is not None:
                client = stack.enter_context(Client(cluster))
            else:
                from hpcpath.cluster.tls import cluster_security

                client = stack.enter_context(Client(target, timeout=spec.worker_timeout,
                                                    security=cluster_security(spec)))
        except OSError as exc:
            raise ClusterError(
                f"cannot connect to the scheduler {target}: {_one_line(exc)}"
            ) from exc
        host = getattr(spec, "dashboard_address", "").rpartition(":")[0].strip("[]")
        if host not in ("", "0.0.0.0", "::"):
            _DASHBOARD_HOSTS[client] = host
        if _expects_workers(spec, n_workers_override):
            _wait_for_worker(client, cluster, spec)
        yield client


@contextmanager
def _quiet_logs(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise these loggers to ``level`` for the duration (never lower them)."""
    loggers = [logging.getLogger(name) for name in names]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            if lg.getEffectiveLevel() < level:
                lg.setLevel(level)
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


class _ExpectedWorkerLoss(logging.Filter):
    """Drops Dask's warnings about a worker that left with tasks to redo: a worker retiring
    at its lifetime with no other worker to take its results (one job at a time), or a job
    ended by Slurm.  Dask reruns the tasks, the outputs are the same, and the run's own
    lines say what matters; ``verbose`` keeps them.  The scheduler's "Couldn't gather keys"
    (an ERROR) is the same event seen by a gather that raced the worker's exit: the client
    resets those futures and gathers them again once they are recomputed."""

    PHRASES = (
        "could not be moved as there are no suitable workers",  # active_memory_manager
        "Could not retire worker",
        "which will be recomputed elsewhere",
        "Couldn't gather keys",  # scheduler.gather; Client._gather reschedules and retries
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p in message for p in self.PHRASES)


@contextmanager
def _filtered(flt: logging.Filter, *names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _quiet_shutdown() -> None:
    """While the cluster closes, a worker slow to exit (TensorFlow's threads) is killed by its
    nanny with a warning that says nothing to the user; during the run such warnings stay."""
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)


def _wait_for_worker(client: Client, cluster: Cluster | None, spec: ClusterSpec) -> None:
    start = time.monotonic()
    deadline = start + spec.worker_timeout
    while True:
        try:
            client.wait_for_workers(1, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            return
        except (TimeoutError, asyncio.TimeoutError):
            pass
        if isinstance(spec, SlurmSpec):
            queued, why = slurm_job_states(cluster, spec)
            if not queued:  # nothing left that could still start a worker
                break
        if time.monotonic() >= deadline:
            break
    if isinstance(spec, SchedulerSpec):
        why = f"the scheduler {spec.address} has no workers; start some"
    elif isinstance(spec, LocalSpec):
        why = "local workers did not start; check memory_limit and free memory"
    waited = time.monotonic() - start
    raise ClusterError(f"no Dask worker connected within {waited:.0f} s: {why}")


def dashboard_link(client: Client) -> str:
    """The dashboard URL of ``client``'s scheduler, or "" when it serves none.

    A dashboard bound to one address (the default ``127.0.0.1:0``) is reported on that
    address, which is where it answers (on a login node: through ``ssh -L``).  Distributed's
    ``distributed.dashboard.link`` template is honoured, e.g.
    ``{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status`` for jupyter-server-proxy.
    """
    try:
        link = str(client.dashboard_link or "")
    except (KeyError, AttributeError):
        return ""
    host = _DASHBOARD_HOSTS.get(client)
    if link and host and urlsplit(link).hostname:  # not a host-less template (JupyterHub)
        parts = urlsplit(link)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        link = urlunsplit(parts._replace(netloc=netloc))
    return link

"""Option builders shared by commands, so the same flag means the same thing everywhere."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from distributed import Client

    from hpcpath.backends import Backend


def cluster_options(f=None, *, spark: bool = False):
    """``--cluster`` and ``--workers``; with ``spark`` the command also runs on Spark."""
    if f is None:
        return lambda g: cluster_options(g, spark=spark)
    f = click.option(
        "--workers", type=int, default=None,
        help="Number of local workers (default: one per core; given, a LocalCluster always starts)"
             + ("; with --cluster spark the N of local[N]." if spark else "."),
    )(f)
    if spark:
        f = click.option(
            "--cluster", default=None,
            metavar="auto|local|slurm|FILE.yaml|tcp://ADDR|spark|local[N]|spark://HOST:PORT",
            help="Where it runs: Dask (local, slurm, a scheduler address) or Spark (spark = "
                 "local[N], a standalone master, or a YAML spec with backend: spark) "
                 "(default: $HPCPATH_CLUSTER, else auto: one slide in this process, more on a "
                 "Dask LocalCluster).",
        )(f)
    else:
        f = click.option(
            "--cluster", default=None, metavar="auto|local|slurm|FILE.yaml|tcp://ADDR",
            help="Where Dask runs (default: $HPCPATH_CLUSTER or a LocalCluster).",
        )(f)
    return f


def echo_err(message: str) -> None:
    click.echo(message, err=True)


def _lock_output(stack: ExitStack, out_dir: str | Path | None, lock: str | None, lock_name: str | None) -> None:
    """``OUT`` checked writable and locked for the command, before any cluster starts."""
    if lock and out_dir is not None:
        from hpcpath.runlock import LOCK_NAME, run_lock
        from hpcpath.store import check_output_dir

        stack.enter_context(run_lock(check_output_dir(out_dir), f"hpcpath {lock}", lock_name or LOCK_NAME))


@contextmanager
def dask_session(cluster: Any, workers: int | None, out_dir: str | Path | None = None,
                 *, lock: str | None = None, lock_name: str | None = None) -> Iterator[Client]:
    """The Dask client a command runs on: the cluster started (or joined), hpcpath's page
    added to its dashboard, the dashboard link (and the ssh tunnel to it) printed, and the
    workers' own output sent to ``OUT/hpcpath-logs/`` rather than the terminal.

    With ``lock`` (the command's name) ``OUT`` is checked writable and locked first, so a
    second run on the same folder is refused in one line before any cluster starts."""
    from hpcpath.cluster import cluster_client, dashboard_link, parse_cluster_spec
    from hpcpath.cluster.monitor import LOG_FOLDER, dashboard_lines, install_dashboard_page, install_worker_log
    from hpcpath.cluster.spec import SlurmSpec

    spec = parse_cluster_spec(cluster)
    with ExitStack() as stack:
        _lock_output(stack, out_dir, lock, lock_name)
        client = stack.enter_context(cluster_client(spec, n_workers_override=workers))
        if out_dir is not None:
            install_worker_log(client, Path(out_dir) / LOG_FOLDER)
        install_dashboard_page(client)
        for line in dashboard_lines(dashboard_link(client), on_cluster=isinstance(spec, SlurmSpec)):
            echo_err(f"hpcpath: {line}")
        yield client


@contextmanager
def backend_session(cluster: Any, workers: int | None, out_dir: str | Path | None = None,
                    *, lock: str | None = None, lock_name: str | None = None) -> Iterator[Backend]:
    """The backend a stage command runs on (tile, dataset build, infer: the one place they get
    it): with ``auto`` (the default) and no ``--workers``, an
    :class:`~hpcpath.backends.auto.AutoBackend` that runs a single slide in this process and
    starts :func:`dask_session`'s LocalCluster only for more; else :func:`dask_session`
    wrapped as a Dask backend, or a Spark session (``--cluster spark``, ``local[N]``,
    ``spark://...``, a YAML spec with ``backend: spark``) with the Spark UI link printed.
    Locking as in :func:`dask_session`."""
    from hpcpath.cluster import parse_cluster_spec

    spec = parse_cluster_spec(cluster)
    if spec.backend == "auto" and workers is None:
        from hpcpath.backends.auto import AutoBackend
        from hpcpath.backends.dask import DaskBackend

        with ExitStack() as stack:
            _lock_output(stack, out_dir, lock, lock_name)
            yield AutoBackend(lambda: DaskBackend(stack.enter_context(dask_session(spec, None, out_dir))),
                              say=lambda line: echo_err(f"hpcpath: {line}"))
        return
    if spec.backend != "spark":
        from hpcpath.backends.dask import DaskBackend

        with dask_session(spec, workers, out_dir, lock=lock, lock_name=lock_name) as client:
            yield DaskBackend(client)
        return
    from hpcpath.backends.spark import spark_backend

    if workers is not None and workers < 1:
        from hpcpath.errors import ConfigError

        raise ConfigError(f"the number of workers must be at least 1, got {workers}")
    with ExitStack() as stack:
        _lock_output(stack, out_dir, lock, lock_name)
        log = None
        if out_dir is not None:
            from hpcpath.cluster.monitor import LOG_FOLDER

            log = Path(out_dir) / LOG_FOLDER / "spark-driver.log"
        backend = stack.enter_context(spark_backend(spec, workers, log_file=log))
        ui = backend.sc.uiWebUrl
        echo_err(f"hpcpath: Spark {backend.sc.master}" + (f", UI {ui}" if ui else ""))
        yield backend

"""Where a stage's work runs: Dask, Spark, or this process.

Stages (tiling, dataset building, inference) describe their work as plain data -- a plan
per slide, units per planned slide, a finish on the driver (:mod:`hpcpath.backends.base`)
-- and take a *backend* that runs it:

- :class:`~hpcpath.backends.dask.DaskBackend`: a ``distributed.Client`` (LocalCluster,
  Slurm workers, a running scheduler);
- :class:`~hpcpath.backends.spark.SparkBackend`: a ``SparkSession`` (``local[N]``, a
  standalone ``spark://`` master, YARN);
- :class:`~hpcpath.backends.inline.InlineBackend`: this process, a thread per core;
- :class:`~hpcpath.backends.auto.AutoBackend`: ``--cluster auto``, the default: a single
  slide in this process, a LocalCluster started for more.

:func:`as_backend` turns what a caller has (a backend, a Dask client, a SparkSession or
nothing: the default Dask client) into one; :func:`open_backend` starts the one a cluster
spec describes.  Stage modules import neither Dask nor Spark.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hpcpath.backends.base import Backend, Outcome, SlideLoop, Unit, one_line, phases


def expect_slides(backend: Any, n_slides: int) -> None:
    """Tell a backend that chooses where to run (``auto``) how many slides the next run has;
    a stage calls it before asking the backend about its workers (inference's GPU check)."""
    expect = getattr(backend, "expect", None)
    if expect is not None:
        expect(n_slides)


__all__ = ["Backend", "Outcome", "SlideLoop", "Unit", "as_backend", "expect_slides", "one_line",
           "open_backend", "phases"]


def as_backend(obj: Any = None) -> Backend:
    """``obj`` as a backend: a backend as is, a Dask ``Client``, a ``SparkSession`` or
    ``SparkContext``, the string ``"inline"``, or None (the current Dask client)."""
    if obj is None:
        from distributed import default_client

        obj = default_client()
    if isinstance(obj, str) and obj == "inline":
        from hpcpath.backends.inline import InlineBackend

        return InlineBackend()
    module = type(obj).__module__
    if module.startswith("pyspark"):
        from hpcpath.backends.spark import SparkBackend

        return SparkBackend(obj)
    if module.startswith("distributed"):
        from hpcpath.backends.dask import DaskBackend

        return DaskBackend(obj)
    if isinstance(obj, Backend):
        return obj
    raise TypeError(f"not a backend, Dask client or SparkSession: {type(obj).__name__}")


@contextmanager
def open_backend(spec: Any = None, n_workers: int | None = None) -> Iterator[Backend]:
    """The backend a cluster spec describes (:func:`hpcpath.cluster.parse_cluster_spec`),
    started, and closed on exit.  Dask specs yield a :class:`DaskBackend` whose ``client``
    is the cluster's client."""
    from hpcpath.cluster.spec import parse_cluster_spec

    spec = parse_cluster_spec(spec)
    if spec.backend == "spark":
        from hpcpath.backends.spark import spark_backend

        with spark_backend(spec, n_workers) as backend:
            yield backend
        return
    from hpcpath.backends.dask import DaskBackend
    from hpcpath.cluster import cluster_client

    with cluster_client(spec, n_workers_override=n_workers) as client:
        yield DaskBackend(client)

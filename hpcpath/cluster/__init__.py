"""The one place that turns a cluster spec into a Dask client.

Stages never build clusters; they take a ``distributed.Client``.  A command line, a notebook
or a test makes one with::

    from hpcpath.cluster import cluster_client

    with cluster_client("configs/cluster-slurm.yaml") as client:
        run_stage(..., client=client)

A *spec* is one of three small, frozen, validated models told apart by ``backend``:

- :class:`LocalSpec` (``local``): a ``LocalCluster`` of worker processes on this machine,
  bound to 127.0.0.1.
- :class:`SlurmSpec` (``slurm``): ``dask_jobqueue.SLURMCluster`` (the optional ``slurm``
  extra): the scheduler runs here, each Slurm job runs ``processes`` workers.  With
  ``gpus_per_job`` the jobs ask for ``--gres=gpu:N`` and every worker advertises the Dask
  resource ``GPU`` (submit GPU work with ``resources={"GPU": 1}``); when a job runs several
  worker processes, each one is pinned to its own share of the job's GPUs through
  ``CUDA_VISIBLE_DEVICES`` (see :func:`dask_setup`).
- :class:`SchedulerSpec` (``scheduler``): connect to a running scheduler at ``address``.

:func:`parse_cluster_spec` reads ``"local"``, ``"slurm"``, ``"tcp://host:port"`` (any
``scheme://`` address), a YAML file (the fields below at the top level or under a
``cluster:`` key), a mapping, or ``None``.

Precedence, resolved once by :func:`parse_cluster_spec`: an explicit spec (argument, CLI
option) wins; else the environment variable ``HPCPATH_CLUSTER`` (any of the strings above);
else the packaged default, :class:`LocalSpec` with one worker per core.  Fields not set in
a file keep the defaults of their model.

Every mistake in a spec is a :class:`~hpcpath.errors.ConfigError` whose message is one line,
``"<file>: <key>: <what is wrong>"``.
"""

from hpcpath.cluster.client import cluster_client, dashboard_link
from hpcpath.cluster.slurm import dask_setup, slurm_cluster_kwargs
from hpcpath.cluster.spec import ENV_VAR, ClusterSpec, LocalSpec, SchedulerSpec, SlurmSpec, parse_cluster_spec
from hpcpath.errors import ClusterError

__all__ = [
    "ENV_VAR",
    "ClusterError",
    "ClusterSpec",
    "LocalSpec",
    "SchedulerSpec",
    "SlurmSpec",
    "cluster_client",
    "dashboard_link",
    "dask_setup",
    "parse_cluster_spec",
    "slurm_cluster_kwargs",
]

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

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit


from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from hpcpath.config import describe_error, read_yaml
from hpcpath.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed import Client
    from distributed.deploy import Cluster

__all__ = [
    "ENV_VAR",
    "ClusterError",
    "ClusterSpec",
    "LocalSpec",
    "SchedulerSpec",
    "SlurmSpec",
    "cluster_client",
    "dashboard_link",
    "parse_cluster_spec",
    "slurm_cluster_kwargs",
]

logger = logging.getLogger(__name__)

ENV_VAR = "HPCPATH_CLUSTER"
"""Environment variable read when no spec is given: ``local``, ``slurm``, an address or a file."""

_GPUS_PER_WORKER_VAR = "HPCPATH_GPUS_PER_WORKER"
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(infinite|unlimited)$", re.IGNORECASE)
_ADDRESS = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")


def _check_bytes(value: str) -> str:
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is not a size such as '4GB' or '500MiB'") from None
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LocalSpec(_Spec):
    """Worker processes on this machine (``distributed.LocalCluster``)."""

    backend: Literal["local"] = "local"
    n_workers: int | None = Field(None, ge=1, description="default: one per core")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="per worker: 'auto' (share of RAM) or a size")
    dashboard_address: str = "127.0.0.1:0"
    worker_timeout: float = Field(60.0, gt=0, description="seconds to wait for the first worker")

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, value: str) -> str:
        return value if value == "auto" else _check_bytes(value)


class SlurmSpec(_Spec):
    """Dask workers in Slurm jobs (``dask_jobqueue.SLURMCluster``); sizes are per job."""

    backend: Literal["slurm"]
    partition: str | None = Field(None, validation_alias=AliasChoices("partition", "queue"))
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int | None = Field(
        None, ge=1, description="CPU cores per job, shared by its processes; default one each"
    )
    memory: str = Field("4GB", description="memory per job, shared by its processes")
    processes: int | None = Field(
        None, ge=1, description="worker processes per job; default gpus_per_job, or 1"
    )
    gpus_per_job: int = Field(0, ge=0)
    jobs: int = Field(1, ge=1, description="fixed number of jobs (unless adaptive)")
    adaptive_min: int | None = Field(None, ge=0, description="adaptive scaling, in jobs")
    adaptive_max: int | None = Field(None, ge=1)
    interface: str | None = Field(None, description="network interface, e.g. ib0")
    python: str | None = Field(None, description="worker Python; default: the one running hpcpath")
    job_name: str = "hpcpath-worker"
    job_script_prologue: tuple[str, ...] = ()
    job_extra_directives: tuple[str, ...] = ()
    worker_extra_args: tuple[str, ...] = ()
    local_directory: str | None = None
    log_directory: str | None = None
    dashboard_address: str = "127.0.0.1:0"
    worker_timeout: float = Field(
        300.0, gt=0, description="seconds to wait for the first worker (queue wait included)"
    )

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        return _check_bytes(value)

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        if not _WALLTIME.match(value):
            raise ValueError(f"{value!r} is not a Slurm time such as '01:00:00' or '2-00:00:00'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSpec:
        procs = self.worker_processes
        if procs > self.job_cores:
            if self.processes:
                why, fix = f"processes={procs}", "raise cores or lower processes"
            else:
                why, fix = (
                    f"gpus_per_job={procs} (a process per GPU)",
                    "raise cores or set processes=1",
                )
            raise ValueError(f"{why} needs cores >= {procs} (cores={self.cores}); {fix}")
        if self.gpus_per_job and self.gpus_per_job % procs:
            raise ValueError(
                f"processes={procs} must divide gpus_per_job={self.gpus_per_job} "
                "(one worker process per GPU, or one process using them all)"
            )
        if self.adaptive_min is not None and self.adaptive_max is None:
            raise ValueError("adaptive_min needs adaptive_max")
        if self.adaptive_max is not None:
            if self.adaptive_min is not None and self.adaptive_min > self.adaptive_max:
                raise ValueError(
                    f"adaptive_min={self.adaptive_min} exceeds adaptive_max={self.adaptive_max}"
                )
            if "jobs" in self.model_fields_set:
                raise ValueError("set either jobs or adaptive_min/adaptive_max, not both")
        return self

    @property
    def worker_processes(self) -> int:
        """Dask worker processes per job."""
        return self.processes or max(self.gpus_per_job, 1)

    @property
    def job_cores(self) -> int:
        """CPU cores per job."""
        return self.cores or self.worker_processes

    @property
    def gpus_per_worker(self) -> int:
        """GPUs each worker process owns (0 without GPUs)."""
        return self.gpus_per_job // self.worker_processes


class SchedulerSpec(_Spec):
    """A scheduler that is already running (started by hand, by a batch script, ...)."""

    backend: Literal["scheduler"]
    address: str
    worker_timeout: float = Field(60.0, gt=0, description="seconds to wait for a worker")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not _ADDRESS.match(value):
            raise ValueError(f"{value!r} is not a scheduler address such as 'tcp://host:8786'")
        return value


ClusterSpec = Annotated[LocalSpec | SlurmSpec | SchedulerSpec, Field(discriminator="backend")]
_ADAPTER: TypeAdapter[ClusterSpec] = TypeAdapter(ClusterSpec)
_MODELS: dict[str, type[_Spec]] = {
    "local": LocalSpec,
    "slurm": SlurmSpec,
    "scheduler": SchedulerSpec,
}


# --------------------------------------------------------------------------- parsing


def parse_cluster_spec(
    value: ClusterSpec | str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> ClusterSpec:
    """Resolve ``value`` (or, when None, ``$HPCPATH_CLUSTER``, else local defaults) to a spec.

    >>> parse_cluster_spec("local").backend
    'local'
    >>> parse_cluster_spec("tcp://10.0.0.5:8786").address
    'tcp://10.0.0.5:8786'
    >>> parse_cluster_spec({"backend": "slurm", "gpus_per_job": 2}).worker_processes
    2
    """
    if isinstance(value, (LocalSpec, SlurmSpec, SchedulerSpec)):
        return value
    source = "cluster spec"
    if value is None:
        value = os.environ.get(ENV_VAR, "").strip() or None
        if value is None:
            return LocalSpec()
        source = f"${ENV_VAR}"
    if isinstance(value, Mapping):
        return _validate(value, None, "")
    if isinstance(value, os.PathLike):
        return _from_file(Path(value))
    if not isinstance(value, str):
        raise ConfigError(
            f"{source}: expected a string, a path or a mapping, got {type(value).__name__}"
        )
    text = value.strip()
    if text == "local":
        return LocalSpec()
    if text == "slurm":
        return SlurmSpec(backend="slurm")
    if _ADDRESS.match(text):
        return SchedulerSpec(backend="scheduler", address=text)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _from_file(path)
    raise ConfigError(
        f"{source}: {value!r} is not 'local', 'slurm', a scheduler address (tcp://host:port) "
        "or a YAML file"
    )


def _from_file(path: Path) -> ClusterSpec:
    data, prefix = read_yaml(path, section="cluster")
    return _validate(data, str(path), prefix)


def _validate(data: Any, path: str | None, prefix: str) -> ClusterSpec:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{where}: expected a mapping of cluster settings, got {type(data).__name__}", path=path
        )
    try:
        return _ADAPTER.validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError(_first_error(exc, data, prefix), path=path) from None


def _first_error(exc: ValidationError, data: Mapping[str, Any], prefix: str) -> str:
    """One line, ``key: message``, for the first of pydantic's errors."""
    err = exc.errors(include_url=False)[0]
    kind, loc = err["type"], list(err["loc"])
    backends = ", ".join(_MODELS)
    if kind == "union_tag_not_found":
        return f"{prefix}backend: missing; expected one of {backends}"
    if kind == "union_tag_invalid":
        return (
            f"{prefix}backend: unknown backend {data.get('backend')!r}; expected one of {backends}"
        )
    # The discriminated union puts the tag first.
    model = _MODELS[str(loc.pop(0))] if loc and loc[0] in _MODELS else None
    if kind == "extra_forbidden" and model is SlurmSpec and loc[-1] in ("queue", "partition"):
        return f"{prefix}{'.'.join(map(str, loc))}: give either partition or queue (the same setting), not both"
    known = sorted(model.model_fields) + (["queue"] if model is SlurmSpec else []) if model else []
    line = describe_error({**err, "loc": loc}, known, prefix)
    if "input" in err and kind not in ("value_error", "assertion_error", "extra_forbidden", "missing"):
        line = f"{line.replace('valid tuple', 'valid list')} (got {err['input']!r})"
    return line


# --------------------------------------------------------------------------- building


def slurm_cluster_kwargs(spec: SlurmSpec) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` (pure; nothing is submitted).

    >>> kw = slurm_cluster_kwargs(SlurmSpec(backend="slurm", gpus_per_job=2))
    >>> kw["cores"], kw["processes"], kw["job_extra_directives"], kw["worker_extra_args"][:2]
    (2, 2, ['--gres=gpu:2'], ['--resources', 'GPU=1'])
    """
    directives = list(spec.job_extra_directives)
    worker_args = list(spec.worker_extra_args)
    prologue = list(spec.job_script_prologue)
    if spec.gpus_per_job:
        directives.insert(0, f"--gres=gpu:{spec.gpus_per_job}")
        worker_args[:0] = ["--resources", f"GPU={spec.gpus_per_worker}"]
        if spec.worker_processes > 1:  # pin each process of the job to its own GPU(s)
            prologue.append(f"export {_GPUS_PER_WORKER_VAR}={spec.gpus_per_worker}")
            worker_args += ["--preload", __name__]
    kwargs: dict[str, Any] = {
        "queue": spec.partition,
        "account": spec.account,
        "walltime": spec.walltime,
        "cores": spec.job_cores,
        "memory": spec.memory,
        "processes": spec.worker_processes,
        "job_name": spec.job_name,
        "python": spec.python or sys.executable,
        "interface": spec.interface,
        "job_script_prologue": prologue,
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
        "local_directory": spec.local_directory,
        "log_directory": spec.log_directory,
        "scheduler_options": {"dashboard_address": spec.dashboard_address},
        "silence_logs": logging.WARNING,
    }
    return kwargs


def dask_setup(worker: Any) -> None:
    """Worker preload: pin one of several worker processes of a GPU job to its own GPU(s).

    Slurm gives the whole job ``CUDA_VISIBLE_DEVICES=0,1,...``; dask-worker names the
    processes of one job ``<name>-0``, ``<name>-1``, ...; process ``i`` keeps devices
    ``[i*k, (i+1)*k)`` where ``k`` is ``$HPCPATH_GPUS_PER_WORKER``.  Runs before the worker
    connects, so before any task can initialise CUDA.
    """
    per_worker = int(os.environ.get(_GPUS_PER_WORKER_VAR, "0") or 0)
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    suffix = str(worker.name).rpartition("-")[2]
    if per_worker < 1 or not suffix.isdigit():
        return
    index = int(suffix)
    mine = devices[index * per_worker : (index + 1) * per_worker]
    if len(mine) != per_worker:
        logger.warning(
            "worker %s: cannot pin GPU(s): CUDA_VISIBLE_DEVICES=%s", worker.name, ",".join(devices)
        )
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)


def _local_cluster(spec: LocalSpec, n_workers: int | None) -> Cluster:
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    try:
        return LocalCluster(
            n_workers=n_workers or spec.n_workers or CPU_COUNT,
            threads_per_worker=spec.threads_per_worker,
            processes=True,
            memory_limit=spec.memory_limit,
            host="127.0.0.1",
            dashboard_address=spec.dashboard_address,
            silence_logs=logging.WARNING,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"local cluster: {_one_line(exc)}") from exc


def _slurm_cluster(spec: SlurmSpec, n_workers: int | None) -> Cluster:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "the slurm backend needs dask-jobqueue: pip install 'hpcpath[slurm]'"
        ) from None
    try:
        cluster = SLURMCluster(**slurm_cluster_kwargs(spec))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"slurm cluster: {_one_line(exc)}") from exc
    except RuntimeError as exc:  # e.g. an interface this host does not have
        raise ClusterError(f"cannot start the scheduler: {_one_line(exc)}") from exc
    try:
        _test_job_script(cluster.job_script())
        if n_workers is not None:
            cluster.scale(n_workers)
        elif spec.adaptive_max is not None:
            cluster.adapt(minimum_jobs=spec.adaptive_min or 0, maximum_jobs=spec.adaptive_max)
        else:
            cluster.scale(jobs=spec.jobs)
        # Submit now and look: dask-jobqueue only logs a failed sbatch, it does not raise.
        cluster.sync(cluster._correct_state)
        failed = sum(1 for job in cluster.workers.values() if not getattr(job, "job_id", None))
        if failed:
            raise ClusterError(
                f"sbatch failed for {failed} worker job(s); see the error logged above"
            )
    except BaseException:
        cluster.close()
        raise
    return cluster


def _test_job_script(script: str) -> None:
    """``sbatch --test-only`` the worker job script, so Slurm's refusal comes back verbatim."""
    with tempfile.TemporaryDirectory(prefix="hpcpath-") as tmp:
        path = Path(tmp, "worker-job.sh")
        path.write_text(script, encoding="utf-8")
        try:
            _run(["sbatch", "--test-only", str(path)])
        except ClusterError as exc:
            raise ClusterError(f"Slurm rejects the worker job: {exc.message}") from None


def _run(cmd: Sequence[str], timeout: float = 30) -> str:
    """Run a scheduler command; a failure names the command, exit code and stderr."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ClusterError(f"{cmd[0]}: command not found (is this a Slurm login node?)") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{shown}: {exc}") from None
    if proc.returncode:
        detail = _one_line(proc.stderr or proc.stdout) or "no output"
        raise ClusterError(f"{shown} exited with {proc.returncode}: {detail}")
    return proc.stdout


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:500]


def _slurm_job_states(cluster: Cluster | None, spec: SlurmSpec) -> tuple[bool, str]:
    """(whether any of this cluster's jobs is still queued, a one-line why and what to do)."""
    ids = [
        str(j.job_id)
        for j in getattr(cluster, "workers", {}).values()
        if getattr(j, "job_id", None)
    ]
    logs = spec.log_directory or "the submit directory (slurm-<jobid>.out)"
    if not ids:
        return False, "no Slurm job was submitted"
    try:
        out = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"], timeout=10)
    except ClusterError as exc:
        return True, f"Slurm jobs {', '.join(ids)}: squeue failed: {exc.message}"
    jobs = [line.split(None, 2) for line in out.strip().splitlines()]
    if not jobs:
        return False, f"Slurm job(s) {', '.join(ids)} ended before a worker connected; see {logs}"
    states = ", ".join(
        f"{j[0]} {j[1]}" + (f" ({j[2]})" if len(j) > 2 and j[2] != "None" else "") for j in jobs
    )
    return True, (
        f"Slurm job(s) {states}; raise worker_timeout if the queue is busy, or see {logs}"
    )


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
    if n_workers_override is not None and n_workers_override < 1:
        raise ConfigError(f"the number of workers must be at least 1, got {n_workers_override}")
    with ExitStack() as stack:
        if not verbose:
            stack.enter_context(_quiet_logs("distributed", "dask_jobqueue"))
        cluster: Cluster | None = None
        target: str = spec.backend
        if isinstance(spec, LocalSpec):
            cluster = stack.enter_context(_local_cluster(spec, n_workers_override))
        elif isinstance(spec, SlurmSpec):
            cluster = stack.enter_context(_slurm_cluster(spec, n_workers_override))
        else:
            target = spec.address
            if n_workers_override is not None:
                logger.warning(
                    "ignoring n_workers_override=%d: cannot scale %s", n_workers_override, target
                )
        try:
            if cluster is not None:
                client = stack.enter_context(Client(cluster))
            else:
                client = stack.enter_context(Client(target, timeout=spec.worker_timeout))
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
def _quiet_logs(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for the duration (never lower them)."""
    loggers = [logging.getLogger(name) for name in names]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            if lg.getEffectiveLevel() < logging.WARNING:
                lg.setLevel(logging.WARNING)
        yield
    finally:
        for lg, level in zip(loggers, old, strict=True):
            lg.setLevel(level)


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
            queued, why = _slurm_job_states(cluster, spec)
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
    address, which is where it answers (on a login node: through ``ssh -L``).
    """
    try:
        link = str(client.dashboard_link or "")
    except (KeyError, AttributeError):
        return ""
    host = _DASHBOARD_HOSTS.get(client)
    if link and host:
        parts = urlsplit(link)
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        link = urlunsplit(parts._replace(netloc=netloc))
    return link

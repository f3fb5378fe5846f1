"""Cluster specs: three small, frozen, validated models told apart by ``backend``, and
:func:`parse_cluster_spec`, which resolves a string, file, mapping or nothing to one of them.
Every mistake is a :class:`~hpcpath.errors.ConfigError` of one line, ``"<file>: <key>: <what
is wrong>"``.  See :mod:`hpcpath.cluster` for the whole picture."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

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
from hpcpath.errors import ConfigError

__all__ = ["ENV_VAR", "ClusterSpec", "LocalSpec", "SchedulerSpec", "SlurmSpec", "SparkSpec",
           "parse_cluster_spec"]

ENV_VAR = "HPCPATH_CLUSTER"
"""Environment variable read when no spec is given: ``local``, ``slurm``, an address or a file."""

_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^(infinite|unlimited)$", re.IGNORECASE)
_ADDRESS = re.compile(r"^[a-z][a-z0-9+.-]*://\S+$")
_SPARK_MASTER = re.compile(r"^(local(\[(\*|[1-9]\d*)(,\s*[1-9]\d*)?\])?|spark://\S+|yarn|k8s://\S+)$")
_NO_LIMIT = ("infinite", "unlimited")


def slurm_seconds(value: str) -> int | None:
    """Seconds in a Slurm time (``sbatch --time``); None for no limit (``infinite``, ``0``).

    >>> slurm_seconds("90"), slurm_seconds("01:30"), slurm_seconds("1:00:00"), slurm_seconds("2-12")
    (5400, 90, 3600, 216000)
    """
    text = value.strip().lower()
    if text in _NO_LIMIT:
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:  # minutes
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:  # minutes:seconds
        h, m, s = 0, *parts
    else:  # hours:minutes:seconds
        h, m, s = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s or None


def _duration_seconds(value: str) -> float:
    """A worker lifetime: a Slurm time with colons (``00:50:00``) or a number with a unit
    (``50m``, ``3000s``, ``1h``); a bare number is refused (Slurm reads minutes, Dask seconds)."""
    text = value.strip()
    if ":" in text and _WALLTIME.match(text):
        return float(slurm_seconds(text) or 0)
    if re.fullmatch(r"[\d.]+", text):
        raise ValueError(f"{value!r} needs a unit ('50m', '90s') or a Slurm time ('00:50:00')")
    from dask.utils import parse_timedelta

    try:
        return float(parse_timedelta(text))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{value!r} is not a duration such as '50m' or '00:50:00'") from None


def _check_bytes(value: str) -> str:
    from dask.utils import parse_bytes

    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise ValueError(f"{value!r} is not a size such as '4GB' or '500MiB'") from None
    return value


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    # TLS between scheduler, workers and client (distributed's Security): ``tls: true``
    # alone uses certificates generated for this run; or name PEM files, shared by all roles
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @model_validator(mode="after")
    def _tls_files(self):
        files = {k: getattr(self, k) for k in ("tls_ca_file", "tls_cert", "tls_key")}
        given = [k for k, v in files.items() if v]
        if given and len(given) < 3:
            missing = ", ".join(k for k in files if k not in given)
            raise ValueError(f"TLS files need all of tls_ca_file, tls_cert, tls_key (missing {missing})")
        for k, v in files.items():
            if v and not Path(v).expanduser().is_file():
                raise ValueError(f"{k}: no such file {v!r}")
        if given and not self.tls:
            raise ValueError("TLS files given but tls is false (set tls: true)")
        return self


class LocalSpec(_Spec):
    """Worker processes on this machine (``distributed.LocalCluster``).

    ``backend: auto`` (the default when nothing is given) is the same cluster, started only
    when a run has more than one slide: a single slide runs in the calling process
    (:class:`hpcpath.backends.auto.AutoBackend`), with no cluster start-up to pay."""

    backend: Literal["local", "auto"] = "local"
    n_workers: int | None = Field(None, ge=1, description="default: one per core")
    threads_per_worker: int = Field(1, ge=1)
    pin_workers: bool = Field(
        True, description="pin each worker process to its own cores (os.sched_setaffinity), cores "
        "split evenly, and size its thread pools (BLAS, Blosc, TensorFlow) to them")
    cores_per_worker: int | None = Field(
        None, ge=1, description="cores each pinned worker gets; default: the cores split evenly")
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
    worker_lifetime: str = Field(
        "auto",
        description="retire each worker this long after it starts, before the job's walltime "
        "ends, and submit a replacement job: 'auto' (walltime less a margin), 'none', or a "
        "duration ('50m', '00:50:00')",
    )
    worker_lifetime_stagger: str | None = Field(
        None, description="spread retirements by up to +/- this (default 5% of walltime, <= 5 min)"
    )
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

    @field_validator("worker_lifetime", "worker_lifetime_stagger", mode="before")
    @classmethod
    def _number_as_text(cls, value: Any) -> Any:  # YAML `50`: said to need a unit, below
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("worker_lifetime")
    @classmethod
    def _lifetime(cls, value: str) -> str:
        if value.strip().lower() not in ("auto", "none"):
            _duration_seconds(value)
        return value

    @field_validator("worker_lifetime_stagger")
    @classmethod
    def _stagger(cls, value: str | None) -> str | None:
        if value is not None:
            _duration_seconds(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SlurmSpec:
        self.worker_retirement  # noqa: B018 - raises ValueError where the lifetime cannot fit
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
    def worker_retirement(self) -> tuple[float, float] | None:
        """(lifetime, stagger) in seconds for dask-worker's ``--lifetime``/``--lifetime-stagger``,
        or None (no walltime, ``worker_lifetime: none``, or ``--lifetime`` already in
        ``worker_extra_args``).

        A worker killed by Slurm at its walltime loses its running tasks and counts against
        them (after 3 such deaths a task fails with KilledWorker); one that retires first
        hands its results over and leaves cleanly.  'auto' retires it ``margin + stagger``
        before the walltime, the margin (10% of it, 20 s to 10 min) covering the worker's
        start-up in the job and the hand-over.

        >>> SlurmSpec(backend="slurm", walltime="01:00:00").worker_retirement
        (3060.0, 180.0)
        >>> SlurmSpec(backend="slurm", walltime="00:01:00").worker_retirement
        (37.0, 3.0)
        """
        walltime = slurm_seconds(self.walltime)
        lifetime = self.worker_lifetime.strip().lower()
        own = any(a == "--lifetime" or a.startswith("--lifetime=") for a in self.worker_extra_args)
        if own and lifetime != "auto":
            raise ValueError(
                "worker_lifetime and --lifetime in worker_extra_args: give one of them"
            )
        if lifetime == "none" or own or (lifetime == "auto" and walltime is None):
            return None
        if self.worker_lifetime_stagger is not None:
            stagger = _duration_seconds(self.worker_lifetime_stagger)
        else:
            stagger = min(0.05 * (walltime or _duration_seconds(self.worker_lifetime)), 300.0)
        if lifetime == "auto":
            assert walltime is not None
            margin = min(max(0.1 * walltime, 20.0), 600.0)
            seconds = walltime - margin - stagger
            if seconds < 10:
                raise ValueError(
                    f"walltime {self.walltime!r} leaves a worker {seconds:.0f} s before it must "
                    "retire; raise walltime, or set worker_lifetime: none"
                )
            return round(seconds, 1), round(stagger, 1)
        seconds = _duration_seconds(self.worker_lifetime)
        if stagger >= seconds:
            raise ValueError(
                f"worker_lifetime_stagger ({stagger:.0f} s) must be less than worker_lifetime "
                f"({seconds:.0f} s)"
            )
        if walltime is not None and seconds + stagger >= walltime:
            raise ValueError(
                f"worker_lifetime {self.worker_lifetime!r} (+ stagger {stagger:.0f} s) must end "
                f"before walltime {self.walltime!r}, with room for the worker to start and retire"
            )
        return seconds, stagger

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


class SparkSpec(BaseModel):
    """A Spark cluster (:mod:`hpcpath.backends.spark`): ``local[N]``, a standalone master
    ``spark://host:port``, ``yarn`` or ``k8s://...``.  Sizes are per executor."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    backend: Literal["spark"]
    master: str = Field("local[*]", description="local[N], spark://HOST:PORT, yarn, k8s://...")
    app_name: str = "hpcpath"
    executor_cores: int | None = Field(None, ge=1, description="task slots per executor")
    executor_memory: str | None = Field(None, description="JVM heap per executor, e.g. '4g'")
    driver_memory: str | None = None
    executor_gpus: int = Field(0, ge=0, description="GPUs per executor; each task gets one")
    gpu_discovery_script: str | None = Field(
        None, description='script printing {"name": "gpu", "addresses": [...]} on each worker')
    python: str | None = Field(None, description="executors' Python; default: the one running hpcpath")
    conf: dict[str, str | int | float | bool] = Field(default_factory=dict, description="more spark.* settings")
    worker_timeout: float = Field(120.0, gt=0, description="seconds to wait for a first executor")

    @field_validator("master")
    @classmethod
    def _master(cls, value: str) -> str:
        if not _SPARK_MASTER.match(value.strip()):
            raise ValueError(f"{value!r} is not a Spark master such as 'local[2]', "
                             "'spark://host:7077', 'yarn' or 'k8s://https://host:443'")
        return value.strip()

    @field_validator("executor_memory", "driver_memory")
    @classmethod
    def _jvm_size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+[kmgtKMGT]?", value.strip()):
            raise ValueError(f"{value!r} is not a JVM size such as '512m' or '4g'")
        return value

    @field_validator("conf")
    @classmethod
    def _conf(cls, value: dict) -> dict:
        bad = [k for k in value if not str(k).startswith("spark.")]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a Spark setting (they start with 'spark.')")
        return value

    @model_validator(mode="after")
    def _gpus(self) -> SparkSpec:
        script = self.gpu_discovery_script
        if self.executor_gpus and not script and not self.master.startswith(("yarn", "k8s")):
            raise ValueError("executor_gpus needs gpu_discovery_script (a script on every "
                             'worker that prints {"name": "gpu", "addresses": ["0", ...]})')
        return self  # the script lives on the workers: whether it runs is Spark's to say


ClusterSpec = Annotated[LocalSpec | SlurmSpec | SchedulerSpec | SparkSpec, Field(discriminator="backend")]


@functools.cache
def _adapter() -> TypeAdapter[ClusterSpec]:
    """The union's validator, built on first use (not at import: a one-slide run never needs it)."""
    return TypeAdapter(ClusterSpec)

_MODELS: dict[str, type[BaseModel]] = {
    "local": LocalSpec,
    "slurm": SlurmSpec,
    "scheduler": SchedulerSpec,
    "spark": SparkSpec,
    "auto": LocalSpec,
}


# --------------------------------------------------------------------------- parsing


def parse_cluster_spec(
    value: ClusterSpec | str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> ClusterSpec:
    """Resolve ``value`` (or, when None, ``$HPCPATH_CLUSTER``, else ``auto``) to a spec.

    >>> parse_cluster_spec("local").backend, parse_cluster_spec("auto").backend
    ('local', 'auto')
    >>> parse_cluster_spec("tcp://10.0.0.5:8786").address
    'tcp://10.0.0.5:8786'
    >>> parse_cluster_spec({"backend": "slurm", "gpus_per_job": 2}).worker_processes
    2
    >>> parse_cluster_spec("spark://10.0.0.5:7077").master, parse_cluster_spec("spark").master
    ('spark://10.0.0.5:7077', 'local[*]')
    """
    if isinstance(value, (LocalSpec, SlurmSpec, SchedulerSpec, SparkSpec)):
        return value
    source = "cluster spec"
    if value is None:
        value = os.environ.get(ENV_VAR, "").strip() or None
        if value is None:
            return LocalSpec(backend="auto")
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
    if text in ("local", "auto"):
        return LocalSpec(backend=text)
    if text == "slurm":
        return SlurmSpec(backend="slurm")
    if text == "spark":
        return SparkSpec(backend="spark")
    if _SPARK_MASTER.match(text):
        return SparkSpec(backend="spark", master=text)
    if _ADDRESS.match(text):
        return SchedulerSpec(backend="scheduler", address=text)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _from_file(path)
    raise ConfigError(
        f"{source}: {value!r} is not 'local', 'slurm', a scheduler address (tcp://host:port), "
        "'spark', a Spark master (local[N], spark://host:port), 'auto' or a YAML file"
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
        return _adapter().validate_python(dict(data))
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

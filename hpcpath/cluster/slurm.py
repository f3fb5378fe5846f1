"""The Slurm backend: ``dask_jobqueue.SLURMCluster`` built from a :class:`SlurmSpec`, its job
script checked by ``sbatch --test-only`` first, GPU workers pinned to their own devices, and
the queue asked (``squeue``) why no worker came."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcpath.cluster.spec import SlurmSpec
from hpcpath.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from distributed.deploy import Cluster

__all__ = ["slurm_cluster_kwargs", "dask_setup", "slurm_cluster", "slurm_job_states"]

logger = logging.getLogger(__name__)

_GPUS_PER_WORKER_VAR = "HPCPATH_GPUS_PER_WORKER"


def slurm_cluster_kwargs(spec: SlurmSpec) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` (pure; nothing is submitted).

    >>> kw = slurm_cluster_kwargs(SlurmSpec(backend="slurm", gpus_per_job=2))
    >>> kw["cores"], kw["processes"], kw["job_extra_directives"], kw["worker_extra_args"][:2]
    (2, 2, ['--gres=gpu:2'], ['--resources', 'GPU=1'])
    >>> [line for line in kw["job_script_prologue"] if "INTRAOP" in line]
    ['export TF_NUM_INTRAOP_THREADS=1']
    >>> "export MALLOC_ARENA_MAX=1" in kw["job_script_prologue"]
    True
    """
    from hpcpath._malloc import WORKER_ENV
    from hpcpath.cluster.pinning import thread_env

    directives = list(spec.job_extra_directives)
    worker_args = list(spec.worker_extra_args)
    # Each worker process's thread pools (BLAS, Blosc, TensorFlow) sized to its share of the
    # job's cores, as a pinned LocalCluster worker's are: no oversubscription on a shared
    # node, and the same reductions (so the same float results) as a local run with as many
    # cores per worker.  The user's own prologue comes after, so it can override them.
    per_process = max(1, spec.job_cores // spec.worker_processes)
    prologue = [f"export {k}={v}" for k, v in thread_env(per_process).items()]
    # one malloc arena per worker process, as local workers start with (hpcpath._malloc)
    prologue += [f"export {k}={v}" for k, v in WORKER_ENV.items()]
    prologue += list(spec.job_script_prologue)
    if spec.gpus_per_job:
        directives.insert(0, f"--gres=gpu:{spec.gpus_per_job}")
        worker_args[:0] = ["--resources", f"GPU={spec.gpus_per_worker}"]
        if spec.worker_processes > 1:  # pin each process of the job to its own GPU(s)
            prologue.append(f"export {_GPUS_PER_WORKER_VAR}={spec.gpus_per_worker}")
            worker_args += ["--preload", "hpcpath.cluster"]  # re-exports dask_setup
    retirement = spec.worker_retirement
    if retirement:  # retire before the walltime; slurm_cluster keeps the job count up
        worker_args += ["--lifetime", f"{retirement[0]:g}s", "--lifetime-stagger", f"{retirement[1]:g}s"]
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


def slurm_cluster(spec: SlurmSpec, n_workers: int | None) -> Cluster:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "the slurm backend needs dask-jobqueue: pip install 'hpcpath[slurm]'"
        ) from None
    from hpcpath.cluster.tls import cluster_security

    kwargs = slurm_cluster_kwargs(spec)
    security = cluster_security(spec)
    if security is not None:  # generated certificates go to the job folder, for the jobs
        kwargs.update(security=security, protocol="tls://",
                      shared_temp_directory=spec.log_directory or os.getcwd())
    try:
        cluster = SLURMCluster(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"slurm cluster: {_one_line(exc)}") from exc
    except RuntimeError as exc:  # e.g. an interface this host does not have
        raise ClusterError(f"cannot start the scheduler: {_one_line(exc)}") from exc
    try:
        _test_job_script(cluster.job_script())
        if n_workers is None and spec.adaptive_max is not None:
            cluster.adapt(minimum_jobs=spec.adaptive_min or 0, maximum_jobs=spec.adaptive_max)
        else:
            jobs = spec.jobs if n_workers is None else -(-n_workers // spec.worker_processes)
            cluster.scale(jobs=jobs)
            # A fixed size is kept, not just reached: a job that ends (its workers retired
            # at worker_lifetime, or killed: walltime, scancel, a lost node) is replaced.
            cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
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


def slurm_job_states(cluster: Cluster | None, spec: SlurmSpec) -> tuple[bool, str]:
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

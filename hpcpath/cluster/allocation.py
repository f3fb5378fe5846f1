"""A Dask cluster inside one Slurm allocation, for ``slurm/tile.sbatch`` and
``slurm/infer.sbatch``: the scheduler and the hpcpath driver on the batch node, one Dask
worker per Slurm task (``srun``, across every node of the allocation).

    python -m hpcpath.cluster.allocation run [--gpu-per-task] STAGE [ARGS...]
    python -m hpcpath.cluster.allocation address        # this node's contact address

What passes between nodes goes through a shared path or the network, never a node-local
one: the scheduler file and the logs are in the *job folder* (``$HPCPATH_JOB_DIR``, default
``$SLURM_SUBMIT_DIR/.hpcpath/slurm-<jobid>``, which must be on a filesystem every node
mounts); only each worker's scratch space is node-local (``${TMPDIR:-/tmp}/hpcpath-<jobid>``
of its node, removed when the worker ends).
The scheduler listens on the batch node's *contact address* (:func:`choose_address`: the
interface named by ``$HPCPATH_INTERFACE``, else the address Slurm has for the node), never on
whatever ``gethostbyname(gethostname())`` says (127.0.1.1 on a default Debian host, or
nothing).  The driver starts only once every task's worker has connected, and the job fails
with one line when they do not come.  At the end, the tasks each node ran go to the job log
and ``<job folder>/workers.json`` -- an idle node is visible.

The dashboard listens on ``$HPCPATH_DASHBOARD`` (``HOST:PORT``, ``none`` for no dashboard);
by default on the batch node's contact address, port 8787, so that
``ssh -L 8787:NODE:8787 LOGIN`` reaches it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcpath._malloc import WORKER_ENV, arena_count
from hpcpath.errors import ClusterError
from hpcpath.netaddr import choose_address, contact_address, slurm_node_address

__all__ = [
    "choose_address",
    "contact_address",
    "slurm_node_address",
    "job_dir",
    "pin_gpu",
    "worker_command",
    "run_in_allocation",
]

DASHBOARD_PORT = 8787
DEFAULT_WORKER_TIMEOUT = 120.0


def job_dir(env: Mapping[str, str] | None = None) -> Path:
    """The job folder every node sees: ``$HPCPATH_JOB_DIR``, else
    ``$SLURM_SUBMIT_DIR/.hpcpath/slurm-$SLURM_JOB_ID``.

    >>> job_dir({"SLURM_SUBMIT_DIR": "/home/ann/run", "SLURM_JOB_ID": "42"}).as_posix()
    '/home/ann/run/.hpcpath/slurm-42'
    """
    env = os.environ if env is None else env
    if env.get("HPCPATH_JOB_DIR"):
        return Path(env["HPCPATH_JOB_DIR"])
    submit = env.get("SLURM_SUBMIT_DIR") or os.getcwd()
    return Path(submit, ".hpcpath", f"slurm-{env.get('SLURM_JOB_ID', os.getpid())}")


def pin_gpu(visible: str, local_id: int) -> str:
    """The one device a node's ``local_id``-th task keeps of the step's ``CUDA_VISIBLE_DEVICES``.

    >>> pin_gpu("0,1", 1), pin_gpu("2,3", 0), pin_gpu("0,1", 3), pin_gpu("", 0)
    ('1', '2', '1', '')
    """
    devices = [d for d in visible.split(",") if d]
    return devices[local_id % len(devices)] if devices else ""


def worker_command(
    python: str,
    scheduler_file: str | os.PathLike[str],
    *,
    local_directory: str | os.PathLike[str],
    name: str,
    interface: str | None = None,
    gpu: bool = False,
) -> list[str]:
    """The ``dask worker`` command of one Slurm task: one process, one thread, no memory
    limit (Slurm enforces the job's), the Dask resource ``GPU=1`` when it holds a GPU.

    >>> worker_command("py", "/shared/s.json", local_directory="/tmp/w", name="n1-0", gpu=True)[-4:]
    ['--name', 'n1-0', '--resources', 'GPU=1']
    """
    cmd = [python, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
           "--nworkers", "1", "--nthreads", "1", "--memory-limit", "0",
           "--local-directory", str(local_directory), "--name", name]
    if interface:
        cmd[5:5] = ["--interface", interface]
    if gpu:
        cmd += ["--resources", "GPU=1"]
    return cmd


def _scratch(env: Mapping[str, str]) -> Path:
    """This node's scratch folder for the job: node-local, never shared."""
    return Path(env.get("TMPDIR") or "/tmp", f"hpcpath-{env.get('SLURM_JOB_ID', os.getpid())}")


def _worker_main(scheduler_file: str, gpu_per_task: bool) -> int:
    """One Slurm task: keep its GPU, run the Dask worker in node-local scratch, remove it."""
    env = os.environ
    if gpu_per_task and env.get("CUDA_VISIBLE_DEVICES"):
        env["CUDA_VISIBLE_DEVICES"] = pin_gpu(env["CUDA_VISIBLE_DEVICES"],
                                              int(env.get("SLURM_LOCALID", "0")))
    node = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    scratch = _scratch(env)
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = worker_command(sys.executable, scheduler_file, local_directory=scratch,
                         name=f"{node}-{env.get('SLURM_PROCID', '0')}",
                         interface=env.get("HPCPATH_INTERFACE") or None,
                         gpu=gpu_per_task and bool(env.get("CUDA_VISIBLE_DEVICES")))
    # Temporary files of the worker (TensorFlow's autograph sources...) go there too.
    # One malloc arena per worker (hpcpath._malloc.WORKER_ENV) unless the job sets its own.
    proc = subprocess.Popen(cmd, env={**WORKER_ENV, **env, "TMPDIR": str(scratch)})

    def forward(signum: int, frame: Any) -> None:  # srun's SIGTERM on cancel or step end
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        return proc.wait()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _worker_facts(dask_worker: Any) -> dict[str, Any]:
    return {"name": str(dask_worker.name), "host": socket.gethostname(),
            "tasks": int(dask_worker.state.executed_count), "malloc_arenas": arena_count()}


def _say(message: str) -> None:
    print(f"hpcpath: {message}", file=sys.stderr, flush=True)


class _Terminated(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:])


def run_in_allocation(stage: str, args: Sequence[str], *, gpu_per_task: bool = False,
                      env: Mapping[str, str] | None = None) -> int:
    """Scheduler here, ``srun`` workers on every task, then ``hpcpath STAGE ARGS --cluster
    ADDRESS``; returns the driver's exit status.  Raises :class:`ClusterError` (one line)
    when the cluster cannot be formed."""
    env = dict(os.environ if env is None else env)
    if not env.get("SLURM_JOB_ID"):
        raise ClusterError("not inside a Slurm job (no SLURM_JOB_ID); submit with sbatch")
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    n_nodes = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1)
    timeout = float(env.get("HPCPATH_WORKER_TIMEOUT") or DEFAULT_WORKER_TIMEOUT)
    contact = contact_address(env, multi_node=n_nodes > 1)
    folder = job_dir(env)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot make the job folder {folder}: {exc.strerror}; submit from "
                           "a writable shared folder or set HPCPATH_JOB_DIR") from None
    sched_file = folder / "scheduler.json"
    sched_file.unlink(missing_ok=True)
    dashboard = env.get("HPCPATH_DASHBOARD") or f"{contact}:{DASHBOARD_PORT}"
    dash_args = (["--no-dashboard"] if dashboard.lower() == "none"
                 else ["--dashboard-address", dashboard])
    host = contact if n_nodes > 1 else "127.0.0.1"
    _say(f"job folder {folder} (scheduler file, logs); scheduler on {host}, "
         f"{ntasks} worker(s) on {n_nodes} node(s)")

    py = sys.executable
    sched = workers = None
    old = signal.signal(signal.SIGTERM, _on_term)
    try:
        with open(folder / "scheduler.log", "wb") as log:
            sched = subprocess.Popen(
                [py, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(sched_file),
                 "--host", host, "--port", "0", *dash_args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while not sched_file.exists() or not sched_file.stat().st_size:
            if sched.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"the Dask scheduler did not start on {host}: "
                                   f"{_tail(folder / 'scheduler.log', 2)} (see {folder}/scheduler.log)")
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]

        task = [py, "-m", "hpcpath.cluster.allocation", "worker", str(sched_file)]
        if gpu_per_task:
            task.append("--gpu-per-task")
        with open(folder / "workers.log", "wb") as log:
            # --no-kill: a lost node ends its worker, not the step (Dask redoes its tasks).
            workers = subprocess.Popen(
                ["srun", f"--ntasks={ntasks}", f"--cpus-per-task={env.get('SLURM_CPUS_PER_TASK', '1')}",
                 "--kill-on-bad-exit=0", "--no-kill", "--label", *task],
                stdout=log, stderr=subprocess.STDOUT, env=env)

        from distributed import Client

        try:
            client = Client(address, timeout=60)
        except OSError as exc:
            raise ClusterError(f"cannot reach the scheduler at {address}: {exc}") from None
        formed = False
        with client:
            try:
                _wait_for_all(client, workers, ntasks, timeout, folder)
                formed = True
                # The driver's temporary files stay on this node, in the job's scratch.
                driver_tmp = _scratch(env) / "driver"
                driver_tmp.mkdir(parents=True, exist_ok=True)
                status = subprocess.run([py, "-m", "hpcpath.cli.main", stage, *args,
                                         "--cluster", address],
                                        env={**env, "TMPDIR": str(driver_tmp)}).returncode
                _report_work(client, folder)
            finally:  # a worker that never connected will not close through Dask
                _shutdown(client, workers, grace=15 if formed else 2)
        return status
    except _Terminated as exc:
        _say(f"stopped by {exc}")
        return 143
    finally:
        signal.signal(signal.SIGTERM, old)
        _stop(workers)
        _stop(sched)
        sched_file.unlink(missing_ok=True)
        shutil.rmtree(_scratch(env) / "driver", ignore_errors=True)


def _shutdown(client: Any, workers: subprocess.Popen[bytes], grace: float = 15) -> None:
    """Close the workers through Dask, so each task removes its scratch and the step ends
    on its own (a signal through srun can be cut short by Slurm's KillWait)."""
    try:
        client.shutdown()
    except Exception:  # best effort: _stop() follows
        pass
    try:
        workers.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _wait_for_all(client: Any, workers: subprocess.Popen[bytes], n: int, timeout: float,
                  folder: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(str(w.get("name")) for w in client.scheduler_info(n_workers=-1)["workers"].values())
        if len(names) >= n:
            return
        ended = workers.poll() is not None
        if ended or time.monotonic() > deadline:
            why = (f"the worker step (srun) ended with {workers.returncode}" if ended
                   else f"waited {timeout:.0f} s (HPCPATH_WORKER_TIMEOUT)")
            have = ", ".join(names) or "none"
            raise ClusterError(
                f"{len(names)} of {n} Dask workers connected ({have}); {why}; is {folder} on a "
                f"filesystem every node shares? see {folder}/workers.log"
            )
        time.sleep(0.25)


def _report_work(client: Any, folder: Path) -> None:
    """Tasks each worker ran, to the job log and ``workers.json``: an idle node shows."""
    try:
        facts = client.run(_worker_facts, on_error="return")
    except Exception as exc:  # a report must not fail a finished run
        _say(f"warning: could not ask the workers what they ran: {exc}")
        return
    rows = [dict(address=a, **f) for a, f in sorted(facts.items()) if isinstance(f, dict)]
    (folder / "workers.json").write_text(json.dumps(rows, indent=1) + "\n")
    per_host: dict[str, int] = {}
    for r in rows:
        per_host[r["host"]] = per_host.get(r["host"], 0) + r["tasks"]
    _say("tasks per node: " + ", ".join(f"{h} {t}" for h, t in sorted(per_host.items())))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m hpcpath.cluster.allocation run [--gpu-per-task] STAGE [ARGS...]\n"
             "       python -m hpcpath.cluster.allocation address")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    gpu = "--gpu-per-task" in rest[:1] or (cmd == "worker" and "--gpu-per-task" in rest)
    try:
        if cmd == "address":
            print(contact_address())
            return 0
        if cmd == "worker" and rest:
            return _worker_main(rest[0], gpu)
        if cmd == "run":
            if gpu:
                rest = rest[1:]
            if not rest:
                print(usage, file=sys.stderr)
                return 2
            return run_in_allocation(rest[0], rest[1:], gpu_per_task=gpu)
    except ClusterError as exc:
        print(f"hpcpath: error: {exc}", file=sys.stderr)
        return 1
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

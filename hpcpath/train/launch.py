"""Horovod ranks started by ``srun`` over Gloo: no MPI build, no ssh between nodes.

In the batch script, ``python -m hpcpath.train.launch [SRUN OPTIONS --] COMMAND ...`` starts
Horovod's own rendezvous server for the allocation (what ``horovodrun --gloo`` does), then
``srun COMMAND``: Slurm starts one task per GPU on every node, and each task, when its engine
starts (:func:`slurm_task_env`), takes its Horovod rank from ``SLURM_PROCID`` and its slot
(local rank, node) from the plan the launcher computed.  Tasks are laid out block-wise
(``--distribution=block``, Slurm's default), the order Horovod's plan uses.

The rendezvous address that the other nodes dial is the batch node's *contact address*
(:func:`hpcpath.netaddr.contact_address`, shared with the Dask allocation): the
address of the interface named by ``HPCPATH_INTERFACE`` (e.g. ib0), else the address Slurm
has for the node (``NodeAddr``), never ``gethostbyname(gethostname())`` alone (127.0.1.1 on a
default Debian host, or nothing where names do not resolve).  A failure is one line.
Overrides: ``HPCPATH_RENDEZVOUS_ADDR`` (the address) and ``HPCPATH_GLOO_IFACE`` (Gloo's
interface; default: lo on one node, else the interface holding the address).
:func:`node_addresses` gives tf.distribute's workers the same kind of addresses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

__all__ = ["slurm_task_env", "node_addresses", "main"]

PLAN_ENV = "HPCPATH_HOROVOD_PLAN"


def _hostnames() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return [os.environ.get("SLURMD_NODENAME", socket.gethostname().split(".")[0])]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout.split()
    return out


def _tasks_per_node(n_hosts: int) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` ("2(x3),1") expanded to one count per node."""
    spec = os.environ.get("SLURM_TASKS_PER_NODE", "")
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            counts += [int(n)] * int(rep)
        else:
            counts.append(int(part))
    if len(counts) != n_hosts:
        total = int(os.environ.get("SLURM_NTASKS", n_hosts))
        counts = [total // n_hosts + (i < total % n_hosts) for i in range(n_hosts)]
    return counts


def node_addresses(hosts: list[str]) -> dict[str, str]:
    """The address every node of the job is dialled at: ``NodeAddr`` from Slurm, checked
    (no loopback across nodes; :func:`hpcpath.netaddr.slurm_node_address`)."""
    from hpcpath.netaddr import slurm_node_address

    return {h: slurm_node_address(h, multi_node=len(hosts) > 1) for h in hosts}


def _iface_for(addr: str) -> str:
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == addr for a in addrs):
            return name
    return "lo"


def slurm_task_env() -> None:
    """In an srun task started by :func:`main`: export the HOROVOD_* variables of this
    task's slot.  Does nothing outside such a task."""
    plan = os.environ.get(PLAN_ENV)
    if not plan or "HOROVOD_RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    slots = json.loads(plan)
    rank = int(os.environ["SLURM_PROCID"])
    host, local_rank, local_size, cross_rank, cross_size = slots[rank]
    node = os.environ.get("SLURMD_NODENAME", host)
    if node != host:
        raise RuntimeError(f"task {rank} runs on {node} but the Horovod plan put it on {host}: "
                           "launch with --distribution=block")
    os.environ.update({
        "HOROVOD_HOSTNAME": host, "HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(len(slots)),
        "HOROVOD_LOCAL_RANK": str(local_rank), "HOROVOD_LOCAL_SIZE": str(local_size),
        "HOROVOD_CROSS_RANK": str(cross_rank), "HOROVOD_CROSS_SIZE": str(cross_size),
    })


def main(argv: list[str] | None = None) -> int:
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.http.http_server import RendezvousServer

    argv = list(sys.argv[1:] if argv is None else argv)
    srun_opts: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        srun_opts, argv = argv[:i], argv[i + 1 :]
    if not argv:
        print("usage: python -m hpcpath.train.launch [SRUN OPTIONS --] COMMAND ...", file=sys.stderr)
        return 2
    hosts = _hostnames()
    counts = _tasks_per_node(len(hosts))
    n = sum(counts)
    plan = get_host_assignments(parse_hosts(",".join(f"{h}:{c}" for h, c in zip(hosts, counts))), n)
    single = len(hosts) == 1
    from hpcpath.errors import HpcpathError
    from hpcpath.netaddr import contact_address

    try:
        addr = os.environ.get("HPCPATH_RENDEZVOUS_ADDR") or (
            "127.0.0.1" if single else contact_address(multi_node=True))
    except HpcpathError as exc:
        print(f"hpcpath.train.launch: error: rendezvous address: {exc}", file=sys.stderr)
        return 2
    iface = os.environ.get("HPCPATH_GLOO_IFACE") or ("lo" if single else
                                                     os.environ.get("HPCPATH_INTERFACE") or _iface_for(addr))
    server = RendezvousServer()
    port = server.start()
    server.init(plan)
    env = dict(os.environ)
    env.update({
        PLAN_ENV: json.dumps([[s.hostname, s.local_rank, s.local_size, s.cross_rank, s.cross_size]
                              for s in sorted(plan, key=lambda s: s.rank)]),
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr, "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_IFACE": iface, "PYTHONUNBUFFERED": "1",
    })
    print(f"hpcpath.train.launch: {n} Horovod ranks on {len(hosts)} node(s), rendezvous "
          f"{addr}:{port} ({iface})", file=sys.stderr)
    proc = subprocess.Popen(["srun", "--distribution=block", "--ntasks", str(n), *srun_opts, *argv], env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    code = proc.wait()
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Which address a node is reached at, from the facts Slurm and the machine give: the one
rule the Dask allocation (:mod:`hpcpath.cluster.allocation`) and the training launcher
(:mod:`hpcpath.train.launch`) share, so a scheduler and a Horovod/tf.distribute rendezvous
never listen on a loopback name other nodes cannot dial."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence

from hpcpath.errors import ClusterError

__all__ = ["choose_address", "contact_address", "slurm_node_address"]


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _is_ip(addr: str) -> bool:
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return False
    return True


def choose_address(
    interface: str | None,
    interfaces: Mapping[str, Sequence[str]],
    node_addr: str | None = None,
    resolved: Sequence[str] = (),
    *,
    multi_node: bool = True,
    node: str = "this node",
) -> str:
    """The IPv4 address other nodes dial to reach ``node`` (pure: the caller gathers the facts).

    In order: the first address of ``interface`` (``$HPCPATH_INTERFACE``; ``interfaces`` maps
    names to their IPv4 addresses); else Slurm's ``NodeAddr`` for the node, itself or
    ``resolved`` (what it resolves to) when it is a name; else, on a one-node job, 127.0.0.1.
    A loopback answer is refused when other nodes must dial it.  Failure: one-line
    :class:`ClusterError` naming the fix.

    >>> ifaces = {"lo": ["127.0.0.1"], "eth0": ["192.168.1.5"], "ib0": ["10.1.0.5"]}
    >>> choose_address("ib0", ifaces, "cn5", ["192.168.1.5"])
    '10.1.0.5'
    >>> choose_address(None, ifaces, "10.77.0.11")
    '10.77.0.11'
    >>> choose_address(None, ifaces, "cn5", ["127.0.1.1", "192.168.1.5"])
    '192.168.1.5'
    >>> choose_address(None, {}, None, multi_node=False)
    '127.0.0.1'
    >>> choose_address("ib1", ifaces, "cn5", node="cn5")
    Traceback (most recent call last):
    hpcpath.errors.ClusterError: HPCPATH_INTERFACE=ib1: cn5 has no such network interface (it has eth0, ib0, lo)
    >>> choose_address(None, ifaces, "cn5", ["127.0.1.1"], node="cn5")
    Traceback (most recent call last):
    hpcpath.errors.ClusterError: Slurm's address of cn5 (NodeAddr cn5) is 127.0.1.1, a loopback address other nodes cannot dial; set HPCPATH_INTERFACE to the cluster network's interface (e.g. ib0)
    """  # noqa: E501 - doctest output is one line
    hint = "set HPCPATH_INTERFACE to the cluster network's interface (e.g. ib0)"
    if interface:
        if interface not in interfaces:
            have = ", ".join(sorted(interfaces)) or "none"
            raise ClusterError(
                f"HPCPATH_INTERFACE={interface}: {node} has no such network interface (it has {have})"
            )
        addrs = list(interfaces[interface])
        if not addrs:
            raise ClusterError(f"HPCPATH_INTERFACE={interface}: the interface has no IPv4 address on {node}")
        return addrs[0]
    if node_addr:
        candidates = [node_addr] if _is_ip(node_addr) else list(resolved)
        if not candidates:
            raise ClusterError(
                f"Slurm's address of {node} (NodeAddr {node_addr}) does not resolve; {hint}"
            )
        usable = [a for a in candidates if not _is_loopback(a)]
        if usable:
            return usable[0]
        if not multi_node:
            return candidates[0]
        raise ClusterError(
            f"Slurm's address of {node} (NodeAddr {node_addr}) is {candidates[0]}, a loopback "
            f"address other nodes cannot dial; {hint}"
        )
    if not multi_node:
        return "127.0.0.1"
    raise ClusterError(f"cannot tell which address other nodes reach {node} at (not in a Slurm job?); {hint}")


def _interfaces() -> dict[str, list[str]]:
    import psutil

    return {
        name: [a.address for a in addrs if a.family == socket.AF_INET]
        for name, addrs in psutil.net_if_addrs().items()
    }


def _slurm_node_addr(node: str) -> str | None:
    """``NodeAddr`` of ``node`` as slurmctld has it (``scontrol show node``), or None."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1] or None
    return None


def _resolve(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def contact_address(env: Mapping[str, str] | None = None, *, multi_node: bool | None = None) -> str:
    """This node's contact address (:func:`choose_address` with facts from this machine:
    ``$HPCPATH_INTERFACE``, its interfaces, ``scontrol show node $SLURMD_NODENAME``).
    ``multi_node`` defaults to whether the Slurm job spans several nodes."""
    env = os.environ if env is None else env
    if multi_node is None:
        multi_node = int(env.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1
    interface = env.get("HPCPATH_INTERFACE") or None
    node = env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    node_addr = None if interface else _slurm_node_addr(node) if env.get("SLURM_JOB_ID") else None
    resolved = _resolve(node_addr) if node_addr and not _is_ip(node_addr) else []
    return choose_address(interface, _interfaces(), node_addr, resolved,
                          multi_node=multi_node, node=node)


def slurm_node_address(node: str, *, multi_node: bool = True) -> str:
    """The address another node dials to reach ``node``, from Slurm's ``NodeAddr`` (for a
    node other than this one, where its interfaces cannot be asked)."""
    node_addr = _slurm_node_addr(node)
    if node_addr is None:
        raise ClusterError(f"scontrol show node {node}: no NodeAddr (not a Slurm node?)")
    resolved = [] if _is_ip(node_addr) else _resolve(node_addr)
    return choose_address(None, {}, node_addr, resolved, multi_node=multi_node, node=node)

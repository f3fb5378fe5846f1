"""The Dask backend: plans and units as Dask tasks on a ``distributed.Client``.

Task names come from :func:`hpcpath.cluster.monitor.task_key` (``tile-<slide>/...``), so
the dashboard groups them by stage; slides done / failed are published to hpcpath's
dashboard page (:class:`~hpcpath.cluster.monitor.RunProgress`).  A unit's dependencies are
passed as futures (Dask runs it after them, with their results as arguments); a ``gpu``
unit asks for the worker resource ``GPU: 1``.  A lost scheduler stops the whole run with
one line; anything else fails only its slide.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hpcpath.backends.base import Outcome, SlideLoop, Unit
from hpcpath.errors import ClusterError

__all__ = ["DaskBackend", "scheduler_lost"]


def scheduler_lost(client, exc: BaseException) -> bool:
    """True when ``exc`` is a future cancelled because the client lost its scheduler (killed,
    its node gone): the whole run stops, the slides are not failed one by one."""
    from concurrent.futures import CancelledError

    if not isinstance(exc, CancelledError):
        return False
    return "scheduler-connection-lost" in str(exc) or getattr(client, "status", "running") != "running"


def _lost(client) -> ClusterError:
    address = getattr(getattr(client, "scheduler", None), "address", None) or "the scheduler"
    return ClusterError(f"lost the Dask scheduler {address} mid-run (killed, or its node or job "
                        "ended): nothing more was marked complete; rerun the same command to resume")


class DaskBackend:
    """Runs stages on ``client`` (a ``distributed.Client``)."""

    name = "dask"

    def __init__(self, client) -> None:
        self.client = client

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None:
        from distributed import as_completed

        from hpcpath.cluster.monitor import RunProgress, task_key

        client = self.client
        progress = RunProgress(client, stage, key, len(plans), label=label)

        def done(sid: str, out: Outcome) -> None:
            finish(sid, out)
            progress.slide(sid, out.error)

        loop = SlideLoop(plans, expand, done, on_task)
        try:
            ac = as_completed()
            owner: dict[Any, tuple[str, Unit | None]] = {}
            for sid, (fn, args) in plans.items():
                fut = client.submit(fn, *args, key=task_key(f"{stage}-plan", sid, key), pure=False)
                owner[fut] = (sid, None)
                ac.add(fut)
            for fut in ac:
                sid, unit = owner.pop(fut)
                try:
                    result, error = fut.result(), None
                except Exception as exc:  # noqa: BLE001 - per-slide failure, the run goes on
                    if scheduler_lost(client, exc):
                        raise _lost(client) from None
                    result, error = None, exc
                if unit is None:
                    units = loop.planned(sid, result, error)
                    futs: list[Any] = []
                    for u in units:
                        f = client.submit(
                            u.fn, *u.args, *(futs[a] for a in u.after),
                            key=task_key(u.name[0], sid, *u.name[1:]), pure=False,
                            retries=u.retries or None, resources={"GPU": 1} if u.gpu else None)
                        futs.append(f)
                        owner[f] = (sid, u)
                        ac.add(f)
                else:
                    loop.unit_done(sid, unit, result, error)
        finally:
            progress.close()

    def offers_gpus(self) -> bool:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
        return any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values())

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(*args)`` on every connected worker (each call pinned to its worker)."""
        client = self.client
        workers = sorted(client.scheduler_info(n_workers=-1).get("workers", {}))
        name = getattr(fn, "__name__", "call").replace("_", "-")
        futs = [client.submit(fn, *args, workers=[w], allow_other_workers=False,
                              pure=False, key=f"{name}-{i}-{os.getpid()}-{id(client)}")
                for i, w in enumerate(workers)]
        return client.gather(futs)

    def wait_for_workers(self, n: int, timeout: float) -> int:
        try:
            self.client.wait_for_workers(n, timeout=timeout)
        except TimeoutError:
            pass
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

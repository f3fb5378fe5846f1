"""The driver loop every per-slide stage shares: plan on a worker, fan out, finish.

For each slide a *plan* task runs on a worker and returns a small dict (sizes, never
pixels).  ``expand(slide_id, plan)`` then submits that slide's follow-up tasks; when all of
them are done, ``finish(slide_id, outcome)`` is called once, on the driver, with the summed
integer results per task kind or the first error.  One slide's failure never touches the
others.  Tiling and dataset building are both this loop with different tasks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpcpath.cluster.monitor import RunProgress, task_key
from hpcpath.errors import ClusterError, HpcpathError

__all__ = ["Outcome", "run_per_slide", "one_line", "task_key"]


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


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message of our errors, ``Type: first line`` otherwise."""
    if isinstance(exc, HpcpathError):
        return exc.message
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass
class Outcome:
    """What the driver knows of one slide: its plan, per-kind sums, first error, seconds."""

    plan: dict | None = None
    sums: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    pending: int = 0
    t0: float = field(default_factory=time.perf_counter)


def run_per_slide(
    client,
    plans: dict[str, tuple[Callable, tuple]],
    expand: Callable[[str, dict], list[tuple[Any, str]]],
    finish: Callable[[str, Outcome], None],
    *,
    stage: str,
    key: str = "",
    label: str = "",
    on_task: Callable[[str, str, int], None] | None = None,
) -> None:
    """Run every slide's plan, its expanded tasks, then ``finish``.

    A plan returning ``{"error": msg}`` (a user problem reported as a value, so workers log
    no traceback) or raising fails that slide; so does any follow-up task that raises.
    ``stage`` names the plan tasks (``<stage>-plan``) and, with ``label`` (its output), the
    run on hpcpath's dashboard page.
    """
    from distributed import as_completed

    progress = RunProgress(client, stage, key, len(plans), label=label)
    done = finish

    def finish(sid: str, out: Outcome) -> None:
        done(sid, out)
        progress.slide(sid, out.error)

    try:
        ac = as_completed()
        owner: dict[Any, tuple[str, str]] = {}
        outcomes: dict[str, Outcome] = {}
        for sid, (fn, args) in plans.items():
            fut = client.submit(fn, *args, key=task_key(f"{stage}-plan", sid, key), pure=False)
            owner[fut] = (sid, "plan")
            outcomes[sid] = Outcome()
            ac.add(fut)

        for fut in ac:
            sid, kind = owner.pop(fut)
            out = outcomes[sid]
            if kind == "plan":
                try:
                    plan = fut.result()
                    if "error" in plan:
                        raise HpcpathError(plan["error"])
                except Exception as exc:  # noqa: BLE001 - per-slide failure, the run goes on
                    if scheduler_lost(client, exc):
                        raise _lost(client) from None
                    out.error = one_line(exc)
                    out.seconds = time.perf_counter() - out.t0
                    finish(sid, out)
                    continue
                out.plan = plan
                for f, k in expand(sid, plan):
                    owner[f] = (sid, k)
                    ac.add(f)
                    out.pending += 1
            else:
                out.pending -= 1
                try:
                    n = fut.result()
                    out.sums[kind] = out.sums.get(kind, 0) + int(n)
                    if on_task:
                        on_task(sid, kind, int(n))
                except Exception as exc:  # noqa: BLE001
                    if scheduler_lost(client, exc):
                        raise _lost(client) from None
                    out.error = out.error or one_line(exc)
            if out.plan is not None and out.pending == 0:
                out.seconds = time.perf_counter() - out.t0
                finish(sid, out)
    finally:
        progress.close()

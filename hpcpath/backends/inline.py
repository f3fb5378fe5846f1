"""The in-process backend: every plan and unit runs in this process, on a small thread pool.

No cluster to start: for tests, notebooks and a single slide (``--cluster auto`` runs one
slide here, :mod:`hpcpath.backends.auto`).  Units whose dependencies are done run on
``threads`` threads (default: this process's cores); slide decoding, Blosc and JPEG coding
and file writes release the GIL, so a slide's independent tile and pyramid units use the
cores.  Same semantics as the others (a raising unit is rerun ``retries`` times, then fails
only its slide; a unit whose dependency failed is not run).  The driver's bookkeeping
(``finish``, ``on_task``) runs on the calling thread only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from hpcpath.backends.base import Outcome, SlideLoop, Unit, phases

__all__ = ["InlineBackend", "call_unit"]


def call_unit(fn: Callable, args: tuple, retries: int = 0) -> Any:
    """``fn(*args)``, rerun up to ``retries`` times while it raises (the last error raised)."""
    for attempt in range(retries + 1):
        try:
            return fn(*args)
        except Exception:
            if attempt == retries:
                raise
    raise AssertionError("unreachable")


def default_threads() -> int:
    """The cores this process may use (its affinity mask)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


_FAILED_DEP = "an earlier unit of this slide failed"


class InlineBackend:
    """Runs stages in this process: ``threads`` at a time (None: one per core; 1: one after
    another on the calling thread)."""

    name = "inline"

    def __init__(self, threads: int | None = None) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads or default_threads()

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None:
        loop = SlideLoop(plans, expand, finish, on_task)
        if self.threads > 1 and plans:
            self._run_threads(loop, plans)
            return
        for sid, (fn, args) in plans.items():
            try:
                result, error = fn(*args), None
            except Exception as exc:  # noqa: BLE001 - per-slide failure
                result, error = None, exc
            units = loop.planned(sid, result, error)
            results: list[Any] = [None] * len(units)
            failed: list[bool] = [False] * len(units)
            phases(units)  # checks that units wait only for earlier ones
            for i, u in enumerate(units):
                if any(failed[a] for a in u.after):
                    failed[i] = True
                    loop.unit_done(sid, u, error=_FAILED_DEP)
                    continue
                try:
                    results[i] = call_unit(u.fn, (*u.args, *(results[a] for a in u.after)), u.retries)
                    loop.unit_done(sid, u, results[i])
                except Exception as exc:  # noqa: BLE001
                    failed[i] = True
                    loop.unit_done(sid, u, error=exc)

    def _run_threads(self, loop: SlideLoop, plans: dict[str, tuple[Callable, tuple]]) -> None:
        """Plans, then each unit as soon as the units it waits for are done, ``threads`` at a
        time; results are handed to ``loop`` here, on the calling thread."""
        owner: dict[Future, tuple[str, int]] = {}  # unit index -1: the slide's plan
        units: dict[str, list[Unit]] = {}
        results: dict[str, list[Any]] = {}
        state: dict[str, list[str]] = {}  # per unit: wait, run, ok, fail

        def settle(pool: ThreadPoolExecutor, sid: str) -> None:
            """Start (or fail, after a failed dependency) every unit whose dependencies are in."""
            moved = True
            while moved:
                moved = False
                st = state[sid]
                for i, u in enumerate(units[sid]):
                    if st[i] != "wait" or any(st[a] in ("wait", "run") for a in u.after):
                        continue
                    moved = True
                    if any(st[a] == "fail" for a in u.after):
                        st[i] = "fail"
                        loop.unit_done(sid, u, error=_FAILED_DEP)
                        continue
                    st[i] = "run"
                    args = (*u.args, *(results[sid][a] for a in u.after))
                    owner[pool.submit(call_unit, u.fn, args, u.retries)] = (sid, i)

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="hpcpath-inline")
        try:
            for sid, (fn, args) in plans.items():
                owner[pool.submit(fn, *args)] = (sid, -1)
            while owner:
                done, _ = wait(list(owner), return_when=FIRST_COMPLETED)
                for fut in done:
                    sid, i = owner.pop(fut)
                    exc = fut.exception()
                    if i < 0:
                        us = loop.planned(sid, None if exc else fut.result(), exc)
                        phases(us)  # units wait only for earlier ones
                        units[sid], results[sid], state[sid] = us, [None] * len(us), ["wait"] * len(us)
                    else:
                        state[sid][i] = "fail" if exc else "ok"
                        if exc is None:
                            results[sid][i] = fut.result()
                        loop.unit_done(sid, units[sid][i], results[sid][i], exc)
                    settle(pool, sid)
        finally:  # Ctrl-C or a driver error: start nothing more, do not wait for queued units
            pool.shutdown(wait=True, cancel_futures=True)

    def offers_gpus(self) -> bool:
        return False

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        return [fn(*args)]

    def wait_for_workers(self, n: int, timeout: float) -> int:
        return 1

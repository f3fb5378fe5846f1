"""The in-process backend: every plan and unit runs here, one after another.

No cluster to start: for tests, notebooks and a quick single-slide run.  Same semantics as
the others (a raising unit is rerun ``retries`` times, then fails only its slide).
"""

from __future__ import annotations

from collections.abc import Callable
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


class InlineBackend:
    name = "inline"

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None:
        loop = SlideLoop(plans, expand, finish, on_task)
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
                    loop.unit_done(sid, u, error="an earlier unit of this slide failed")
                    continue
                try:
                    results[i] = call_unit(u.fn, (*u.args, *(results[a] for a in u.after)), u.retries)
                    loop.unit_done(sid, u, results[i])
                except Exception as exc:  # noqa: BLE001
                    failed[i] = True
                    loop.unit_done(sid, u, error=exc)

    def offers_gpus(self) -> bool:
        return False

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        return [fn(*args)]

    def wait_for_workers(self, n: int, timeout: float) -> int:
        return 1

"""What a backend is: the per-slide bookkeeping every engine shares, and the small
interface an engine (Dask, Spark, in-process) implements.

A stage describes its work as plain data and never submits anything itself:

- ``plans``: per slide, a plan function and its arguments; it runs on a worker and returns a
  small dict (sizes, never pixels), or ``{"error": msg}`` for a user problem;
- ``expand(slide_id, plan)`` -> that slide's :class:`Unit` s (function, arguments, kind,
  and the earlier units of the same slide whose results it waits for);
- ``finish(slide_id, outcome)``, on the driver, once per slide, with the per-kind sums of
  the units' integer results or the first error.

Unit functions write their own Zarr chunks (no other unit touches them) and return small
integers, so a unit run twice (a retry after a lost worker, a speculative copy) rewrites
the same bytes; completion markers are written last, by ``finish`` or a last unit.
:class:`SlideLoop` holds the bookkeeping (plans, pending units, sums, first error, when a
slide is finished) so that a backend only decides where units run and when results come.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hpcpath.errors import HpcpathError

__all__ = ["Backend", "Outcome", "SlideLoop", "Unit", "one_line", "phases"]


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message of our errors, ``Type: first line`` otherwise."""
    if isinstance(exc, HpcpathError):
        return exc.message
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@dataclass(frozen=True)
class Unit:
    """One unit of a slide's work: ``fn(*args, *results of after)`` on some worker.

    ``kind`` is the key its integer result is summed under; ``name`` the parts of its task
    name after the slide (``("tile", start, key)`` -> ``tile-<slide>/<start>/<key>``);
    ``after`` the positions, in the slide's unit list, of earlier units it waits for (their
    results are appended to ``args``); ``retries`` how often a raising unit is rerun;
    ``gpu`` that it wants one GPU of its own.
    """

    fn: Callable[..., Any]
    args: tuple
    kind: str
    name: tuple
    after: tuple[int, ...] = ()
    retries: int = 0
    gpu: bool = False


def phases(units: list[Unit]) -> list[int]:
    """Each unit's phase: 0 without dependencies, else one more than its latest dependency.

    >>> u = lambda *after: Unit(print, (), "k", ("x",), after)
    >>> phases([u(), u(), u(0, 1), u(2)])
    [0, 0, 1, 2]
    """
    out: list[int] = []
    for i, u in enumerate(units):
        if any(a >= i or a < 0 for a in u.after):
            raise ValueError(f"unit {i} waits for unit(s) {u.after}: only earlier units allowed")
        out.append(1 + max((out[a] for a in u.after), default=-1))
    return out


@dataclass
class Outcome:
    """What the driver knows of one slide: its plan, per-kind sums, first error, seconds."""

    plan: dict | None = None
    sums: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    pending: int = 0
    t0: float = field(default_factory=time.perf_counter)


class SlideLoop:
    """The driver's per-slide state, fed by a backend: a plan's result, then each unit's.

    A plan returning ``{"error": msg}`` or raising fails its slide; so does any unit that
    raises (the first error is kept, the slide's other units still finish).  ``finish`` is
    called exactly once per slide, when its last unit is in.  One slide's failure never
    touches the others.
    """

    def __init__(self, plans: dict[str, tuple[Callable, tuple]],
                 expand: Callable[[str, dict], list[Unit]],
                 finish: Callable[[str, Outcome], None],
                 on_task: Callable[[str, str, int], None] | None = None) -> None:
        self.plans = plans
        self.expand = expand
        self._finish = finish
        self.on_task = on_task
        self.outcomes = {sid: Outcome() for sid in plans}
        self.finished: set[str] = set()

    def planned(self, sid: str, result: Any = None, error: BaseException | str | None = None) -> list[Unit]:
        """A plan is in (its dict, or the exception / one-line error it raised): its units
        (none when the plan failed; the slide is then finished)."""
        out = self.outcomes[sid]
        try:
            if isinstance(error, str):
                raise HpcpathError(error)
            if error is not None:
                raise error
            if "error" in result:
                raise HpcpathError(result["error"])
        except Exception as exc:  # noqa: BLE001 - per-slide failure, the run goes on
            out.error = one_line(exc)
            self._done(sid)
            return []
        out.plan = result
        units = list(self.expand(sid, result))
        out.pending = len(units)
        if not units:
            self._done(sid)
        return units

    def unit_done(self, sid: str, unit: Unit, result: Any = None, error: BaseException | str | None = None) -> None:
        """A unit is in (its integer result, or the exception / one-line error it raised)."""
        out = self.outcomes[sid]
        out.pending -= 1
        if error is None:
            try:
                n = int(result)
            except (TypeError, ValueError) as exc:
                error = exc
        if error is None:
            out.sums[unit.kind] = out.sums.get(unit.kind, 0) + n
            if self.on_task:
                self.on_task(sid, unit.kind, n)
        elif out.error is None:
            out.error = error if isinstance(error, str) else one_line(error)
        if out.pending == 0:
            self._done(sid)

    def _done(self, sid: str) -> None:
        if sid in self.finished:
            return
        self.finished.add(sid)
        out = self.outcomes[sid]
        out.seconds = time.perf_counter() - out.t0
        self._finish(sid, out)


@runtime_checkable
class Backend(Protocol):
    """Where units run.  ``run`` drives every slide through a :class:`SlideLoop`."""

    name: str

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None: ...

    def offers_gpus(self) -> bool:
        """Whether workers advertise GPUs (units with ``gpu=True`` then get one each)."""
        ...

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(*args)`` once where each unit could run (every Dask worker, every Spark task
        slot with its GPU address set), results in a list: how a stage checks its workers
        (inference's GPU check) without the backend knowing the stage."""
        ...

    def wait_for_workers(self, n: int, timeout: float) -> int:
        """Wait until ``n`` workers (task slots) are there or ``timeout`` passed; how many are."""
        ...

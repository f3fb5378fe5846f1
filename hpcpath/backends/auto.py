"""``--cluster auto`` (the default): a single slide runs in this process, more start a cluster.

Starting a LocalCluster costs seconds (a scheduler, worker processes that import the stack,
a dashboard); a one-slide run is over in less.  :class:`AutoBackend` decides per run, when
it knows how many slides the run has: at most ``max_inline`` slides (and no cluster started
yet) run here on an :class:`~hpcpath.backends.inline.InlineBackend` (a thread per core;
nothing of Dask is imported); more start the cluster (``start_cluster()``, e.g. the CLI's
LocalCluster with its dashboard), which then serves every later run of the session.  The
choice is said in one line through ``say``.  An explicit ``--cluster local``, ``--workers``,
Slurm or Spark never comes here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpcpath.backends.base import Backend, Outcome, Unit
from hpcpath.backends.inline import InlineBackend

__all__ = ["AutoBackend"]


class AutoBackend:
    """In this process for a run of at most ``max_inline`` slides, else ``start_cluster()``'s
    backend (started once, on the first bigger run, and kept)."""

    name = "auto"

    def __init__(self, start_cluster: Callable[[], Backend], *, max_inline: int = 1,
                 threads: int | None = None, say: Callable[[str], None] | None = None) -> None:
        self._start_cluster = start_cluster
        self.max_inline = max_inline
        self.inline = InlineBackend(threads)
        self.cluster: Backend | None = None
        self._say = say or (lambda line: None)
        self._said_inline = False

    @property
    def current(self) -> Backend:
        """The cluster once started, else this process."""
        return self.cluster if self.cluster is not None else self.inline

    def _start(self, why: str) -> None:
        self._say(f"{why}: starting a local Dask cluster (--cluster auto)")
        self.cluster = self._start_cluster()

    def expect(self, n_slides: int) -> Backend:
        """Where a run of ``n_slides`` slides goes (starting the cluster when it must)."""
        if self.cluster is None and n_slides > self.max_inline:
            self._start(f"{n_slides} slides")
        elif self.cluster is None and n_slides and not self._said_inline:
            self._said_inline = True
            word = "slide" if n_slides == 1 else "slides"
            self._say(f"{n_slides} {word}: running in this process on {self.inline.threads} thread(s), "
                      "no Dask cluster and so no dashboard (--cluster local starts one)")
        return self.current

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None:
        self.expect(len(plans)).run(plans, expand, finish, stage=stage, key=key, label=label, on_task=on_task)

    def offers_gpus(self) -> bool:
        return self.current.offers_gpus()

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        return self.current.on_each_slot(fn, *args)

    def wait_for_workers(self, n: int, timeout: float) -> int:
        """Waiting for ``n`` > 1 workers asks for a cluster: it is started now."""
        if n > 1 and self.cluster is None:
            self._start(f"waiting for {n} workers")
        return self.current.wait_for_workers(n, timeout)

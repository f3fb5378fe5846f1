"""Peak resident memory of Dask worker processes, sampled on a thread (shared by the
benchmarks that report worker memory: bench_tiling, bench_memory)."""

from __future__ import annotations

import os
import threading
import time


class RssSampler:
    """Peak RSS (bytes) of the cluster's worker processes, sampled every ``interval`` s.

    ``peak`` is the largest single-process RSS seen (what a per-worker memory limit
    compares with); ``reset()`` starts a new peak without stopping the thread."""

    def __init__(self, client, interval: float = 0.05) -> None:
        import psutil

        pids = client.run(os.getpid).values()
        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        """The current largest worker RSS."""
        rss = 0
        for p in self.procs:
            try:
                rss = max(rss, p.memory_info().rss)
            except Exception:  # noqa: BLE001 - a worker that just exited
                pass
        return rss

    def reset(self) -> None:
        self.peak = self.now()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

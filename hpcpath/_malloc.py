"""Keep glibc from unmapping and re-faulting big buffers on every allocation.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` and TensorFlow's generator
op sets ``M_TRIM_THRESHOLD`` to 128 kB; either way glibc stops raising its mmap threshold, so
every decoded tile (192 kB) and every chunk-sized batch is a fresh mapping whose pages fault
in on first touch.  Measured here: the tile writer and the dataset reader lose a third to a
half of their rate.  Pixel tasks call :func:`keep_large_buffers` once per process; their
memory stays bounded by design (a few chunks), so keeping freed memory costs little.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])

_done = False

WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
"""Environment of every worker process hpcpath starts (LocalCluster: the nanny's pre-spawn
environment; Slurm: the job script), read by glibc when the process starts.

One malloc arena per worker: glibc gives each thread that allocates an arena of its own
(up to 8 per core), and with :func:`keep_large_buffers` each arena keeps up to 64 MB of
freed memory resident.  A worker's task thread, the tile writer thread, zarr's and Dask's
threads held 7-10 arenas, each with the free heap of what it last did: peak worker RSS
7-10 MB higher on the passthrough path and 54 MB on the decode path (20k slide), and it
grew with the number of tasks a slide has.  The same-run A/B shows no loss of tiles per
worker CPU-second on either tile path (docs/benchmarks.md, "Memory against slide size").
Set before the process starts: ``mallopt`` from a preload is too late (the worker's first
threads already have arenas of their own)."""


def one_arena() -> None:
    """:data:`WORKER_ENV`'s one arena for the threads this process starts from now on, set at
    run time: for a command whose own process is the worker -- ``hpcpath tile`` on one slide
    runs its units here (``--cluster auto``), on threads it has not started yet.  A
    ``MALLOC_ARENA_MAX`` in the environment (glibc read it at start) is left to rule."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, int(WORKER_ENV["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def keep_large_buffers(force: bool = False) -> None:
    """Once per process (``force``: again, after a library changed the settings)."""
    global _done
    if (_done and not force) or not sys.platform.startswith("linux"):
        return
    _done = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: give back free memory above 64 MB
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: buffers up to 32 MB from the heap
    except (OSError, AttributeError):
        pass


def trim_after(task: F) -> F:
    """Decorator for worker tasks: hand free heap pages back to the OS when the task ends
    (``malloc_trim(0)``, every arena).  ``keep_large_buffers`` keeps up to 64 MB free per
    arena, and a worker's task thread and zarr's reader threads each have one: the memory a
    task freed otherwise stays resident (the planning task leaves 20-30 MB of it at 100k x
    100k that later tasks do not reuse).  For the once-a-slide tasks only: pages handed back
    fault in again on the next use, ~5% of the decode path's CPU when every tile task and
    pyramid block trimmed (docs/benchmarks.md, "Memory against slide size")."""

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        finally:
            release_free_memory()

    return cast(F, run)


def arena_count(threads: int = 0) -> int:
    """The malloc arenas of this process (glibc's ``malloc_info``; 0 where there is none),
    counted while ``threads`` new threads each hold an allocation: glibc gives each its own
    arena unless the process started with fewer (:data:`WORKER_ENV`)."""
    if not sys.platform.startswith("linux"):
        return 0
    import ctypes
    import tempfile
    import threading

    barrier = threading.Barrier(threads + 1)

    def allocate() -> None:
        block = bytearray(1 << 20)
        barrier.wait()
        del block

    started = [threading.Thread(target=allocate, daemon=True) for _ in range(threads)]
    for t in started:
        t.start()
    barrier.wait()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        with tempfile.NamedTemporaryFile("rb") as tmp:
            f = libc.fopen(tmp.name.encode(), b"w")
            if not f:
                return 0
            libc.malloc_info(0, ctypes.c_void_p(f))
            libc.fclose(ctypes.c_void_p(f))
            return tmp.read().count(b"<heap nr=")
    except (OSError, AttributeError):
        return 0
    finally:
        for t in started:
            t.join()


def release_free_memory() -> None:
    """``malloc_trim(0)`` where glibc has it; nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

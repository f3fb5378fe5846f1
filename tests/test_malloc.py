"""hpcpath._malloc: what the workers' malloc settings do, in a fresh process each (they are
process-wide)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")

SCRIPT = textwrap.dedent("""
    import numpy as np
    from hpcpath._malloc import arena_count, keep_large_buffers, trim_after

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    def churn():  # 48 MB in 1 MB blocks from the heap, freed: kept (trim threshold 64 MB)
        blocks = [np.ones(1 << 20, np.uint8) for _ in range(48)]
        del blocks

    keep_large_buffers()
    churn()
    seen = {"kept": rss_mb()}

    @trim_after
    def task():
        churn()

    task()
    seen["after"] = rss_mb()
    print(seen["kept"] - seen["after"], arena_count(4))
""")


def run(env: dict[str, str]) -> list[float]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=60)
    return [float(v) for v in out.stdout.split()]


def test_trim_after_hands_the_tasks_free_heap_back() -> None:
    released, arenas = run({"MALLOC_ARENA_MAX": "1"})
    assert released > 40  # MB handed back when the task ended
    assert arenas == 1  # four threads allocating at once share the process's one arena

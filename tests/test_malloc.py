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


CLI_SCRIPT = textwrap.dedent("""
    import sys
    from hpcpath._malloc import arena_count
    from hpcpath.cli.main import cli

    try:
        cli.main(args=["tile", sys.argv[1], "-o", sys.argv[2], "--tile-size", "240", "--no-pyramid"],
                 standalone_mode=False)
    except SystemExit:
        pass
    print(arena_count(6))
""")


def test_tile_command_tiles_one_slide_with_the_workers_one_arena(test_data, tmp_path) -> None:
    # `hpcpath tile ONE_SLIDE` runs its units in its own process (--cluster auto): that
    # process gets the workers' malloc setting, so its threads share one arena.
    slide = test_data / "slides" / "cmu-1-small-region.svs"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", CLI_SCRIPT, str(slide), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "cmu-1-small-region.zarr").is_dir(), out.stderr
    assert int(out.stdout.split()[-1]) == 1, out.stdout

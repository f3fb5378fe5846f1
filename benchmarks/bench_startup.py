"""Start-up: a whole ``hpcpath tile`` process on one small slide against its in-process floor.

    flock /tmp/hpcpath-bench.lock .venv/bin/python benchmarks/bench_startup.py --out bench-out
    ... --slide PATH --rounds 7 (defaults: $HPCPATH_TEST_DATA/slides/cmu-1-small-region.svs)

Per round, alternating so that a noisy spell hits all of them:

  cli     wall time of ``hpcpath tile SLIDE -o OUT`` as a new process (Python start, imports,
          the default ``--cluster auto``, the run, the manifest and the report), and of the
          same with ``--cluster local`` (a LocalCluster started for it);
  floor   the same slide in this process (imports warm), one thread, nothing else: the tissue
          test (the slide read at the mask resolution, tissue channel, threshold, per-tile
          fractions), every kept tile read through hpcpath's slide reader (each native tile
          decoded once) and written as Blosc-lz4 chunks of ``chunk_tiles`` into a Zarr v3
          array.  No store layout, no index, no pyramid, no marker;
  info    wall time of ``hpcpath info STORE`` as a new process.

Reported: best and median of each, and of ``cli - floor`` per round (the fixed cost a
single-slide run pays; issue 12 asks for <= 1 s), with user+system CPU seconds of the
processes, the load average before and after, and the Python modules the auto run imported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcpath.config import TileConfig  # noqa: E402

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]


def floor_slide(slide_path: Path, dst: Path, cfg: TileConfig) -> tuple[int, float]:
    """(kept tiles, seconds): tissue test, kept tiles read and written as Blosc-lz4 chunks."""
    import zarr
    from _floor import floor_kept_tiles

    from hpcpath.codecs import array_codecs
    from hpcpath.io import open_slide

    shutil.rmtree(dst, ignore_errors=True)
    t = cfg.tile_size
    t0 = time.perf_counter()
    with open_slide(slide_path) as slide:
        index = floor_kept_tiles(slide, cfg)
        n = len(index)
        arr = zarr.create_array(str(dst), shape=(n, t, t, 3), dtype="uint8", chunks=(cfg.chunk_tiles, t, t, 3),
                                fill_value=0, **array_codecs("blosc-lz4"))
        for c0 in range(0, n, cfg.chunk_tiles):
            sub = index[c0:c0 + cfg.chunk_tiles]
            block = np.empty((len(sub), t, t, 3), np.uint8)
            for k, (x, y) in enumerate(sub[:, :2]):
                block[k] = slide.read(0, int(x), int(y), t, t)
            arr[c0:c0 + len(sub)] = block
    return n, time.perf_counter() - t0


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, cpu, proc


def main() -> None:
    data = Path(os.environ.get("HPCPATH_TEST_DATA", ROOT.parent / "shared" / "data"))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--slide", default=str(data / "slides" / "cmu-1-small-region.svs"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-local", action="store_true", help="skip the --cluster local runs")
    args = ap.parse_args()
    slide = Path(args.slide)
    work = Path(args.out) / "startup"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "HPCPATH_CLUSTER"}
    cfg = TileConfig()
    load0 = os.getloadavg()
    floor_slide(slide, work / "floor.zarr", cfg)  # warm this process's imports and caches once
    store = work / "auto" / f"{slide.stem}.zarr"
    rounds = []
    for _ in range(args.rounds):
        r: dict = {}
        n, r["floor_s"] = floor_slide(slide, work / "floor.zarr", cfg)
        shutil.rmtree(work / "auto", ignore_errors=True)
        r["cli_s"], r["cli_cpu_s"], proc = timed([*HPCPATH, "tile", str(slide), "-o", str(work / "auto")], env)
        r["line"] = next((ln for ln in proc.stderr.splitlines() if "this process" in ln or "cluster" in ln), "")
        if not args.no_local:
            shutil.rmtree(work / "local", ignore_errors=True)
            r["local_s"], r["local_cpu_s"], _ = timed(
                [*HPCPATH, "tile", str(slide), "-o", str(work / "local"), "--cluster", "local"], env)
        r["info_s"], r["info_cpu_s"], _ = timed([*HPCPATH, "info", str(store)], env)
        r["tiles"] = n
        r["overhead_s"] = r["cli_s"] - r["floor_s"]
        print(json.dumps(r), file=sys.stderr)
        rounds.append(r)

    probe = ("import sys, runpy; sys.argv = ['hpcpath', 'tile', {!r}, '-o', {!r}]\n"
             "try:\n    runpy.run_module('hpcpath.cli.main', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print(sorted({{m.split('.')[0] for m in sys.modules}} & {{'distributed', 'bokeh', 'tensorflow', "
             "'keras', 'pyspark', 'dask'}}))").format(str(slide), str(work / "probe"))
    shutil.rmtree(work / "probe", ignore_errors=True)
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env).stdout.strip()

    def stat(key: str) -> dict:
        vals = [r[key] for r in rounds if key in r]
        return {"best": round(min(vals), 3), "median": round(statistics.median(vals), 3)} if vals else {}

    summary = {
        "slide": slide.name, "tiles": rounds[0]["tiles"], "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
        "load_before": load0, "load_after": os.getloadavg(), "auto_line": rounds[0]["line"],
        "heavy_modules_imported_by_auto_run": heavy,
        **{k: stat(k) for k in ("floor_s", "cli_s", "cli_cpu_s", "overhead_s", "local_s", "local_cpu_s",
                                "info_s", "info_cpu_s")},
    }
    (work / "startup.json").write_text(json.dumps({"summary": summary, "rounds": rounds}, indent=2))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Worker memory against slide size: peak RSS while tiling 20k, 50k and 100k px synthetic slides.

    flock /tmp/hpcpath-bench.lock .venv/bin/python benchmarks/bench_memory.py --out bench-out/memory [--arena-max 1]

Slides are ``hpcpath.synth.write_synthetic_slide`` (seed 7, 0.5 um/px, 256-px JPEG tiles),
written tile by tile once and kept under OUT/slides for later invocations (20k: ~13 s,
50k: ~100 s, 100k: ~6 min and 3.9 GB on this machine).  Per size, each phase on a fresh
one-worker, one-thread LocalCluster with its imports warmed (as a long-lived cohort worker):

  plan   ``plan_slide`` alone as a worker task: the worker's peak RSS while it runs (sampled
         every 20 ms) and, inside the task, tracemalloc's peak of Python/NumPy allocations;
  run    ``tile_slides`` with the same options: the worker's peak RSS over the whole run
         (plan, tile writes, pyramid, finalize).

Options are the same for every size (default ``TileConfig``; ``--passthrough`` and
``--tissue-threshold`` override it for all sizes alike).  ``--arena-max N`` repeats each
size's run with ``MALLOC_ARENA_MAX=N`` in the worker's environment (glibc's malloc arenas).  The acceptance of issue 12 item 3
is the run's peak worker RSS at 100k within +-10% of 20k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rss import RssSampler  # noqa: E402

from hpcpath.config import TileConfig  # noqa: E402

MB = 2**20


def _cluster(arena_max: int | None = None):
    import dask
    from distributed import Client, LocalCluster

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if arena_max:  # glibc's malloc arenas of the worker process (default: 8 per core)
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                               dashboard_address=None, memory_limit="8GB", silence_logs=40)
    os.environ.pop("MALLOC_ARENA_MAX", None)  # the nanny also sets it here, for later clusters
    client = Client(cluster)
    got = next(iter(client.run(lambda: os.environ.get("MALLOC_ARENA_MAX")).values()))
    assert got == (str(arena_max) if arena_max else None), got
    # a cohort run's long-lived workers have their imports done: warm them the same way
    client.run(lambda: [__import__(m) for m in ("hpcpath.tiling", "skimage.morphology",
                                                "scipy.ndimage", "scipy.sparse.csgraph")] and None)
    return cluster, client


def _plan_task(slide: str, out: str, cfg: TileConfig) -> dict:
    """Runs on the worker: plan_slide under tracemalloc."""
    import tracemalloc

    from hpcpath.tiling import plan_slide

    tracemalloc.start()
    t0 = time.perf_counter()
    plan = plan_slide(slide, out, cfg)
    secs = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"plan": plan, "seconds": secs, "traced_peak": peak}


def tile_run(slide: Path, work: Path, cfg: TileConfig, arena_max: int | None = None):
    """tile_slides end to end on a fresh worker: (result, seconds, base RSS, peak RSS, path)."""
    from hpcpath.store import open_store
    from hpcpath.tiling import tile_slides

    out = work / f"run-{slide.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cluster, client = _cluster(arena_max)
    try:
        with RssSampler(client, interval=0.02) as rss:
            base = rss.now()
            t0 = time.perf_counter()
            result = tile_slides([slide], out, cfg, client=client)
            secs = time.perf_counter() - t0
            peak = rss.peak
    finally:
        client.close()
        cluster.close()
    assert result.ok, result.records
    st = open_store(next(out.glob("*.zarr")))
    tile_path = (st.metadata.tiling.options.get("tile_path") or {}).get("kind", "?")
    shutil.rmtree(out, ignore_errors=True)
    return result, secs, base, peak, tile_path


def measure(slide: Path, work: Path, cfg: TileConfig, arena_max: int | None = None) -> dict:
    from hpcpath.store import open_store

    out = work / f"plan-{slide.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cluster, client = _cluster()
    try:
        with RssSampler(client, interval=0.02) as rss:
            base = rss.now()
            rss.reset()
            r = client.submit(_plan_task, str(slide), str(out), cfg, pure=False).result()
            plan_peak = rss.peak
    finally:
        client.close()
        cluster.close()
    assert "error" not in r["plan"], r["plan"]
    st = open_store(r["plan"]["store"], require_complete=False)
    mask_shape = st.root["tissue/mask"].shape
    grid = st.metadata.tiling.n_grid_tiles
    shutil.rmtree(out, ignore_errors=True)

    result, secs, run_base, run_peak, tile_path = tile_run(slide, work, cfg)
    extra = {}
    if arena_max:  # the same run again with the worker's malloc arenas capped
        _, secs_a, _, peak_a, _ = tile_run(slide, work, cfg, arena_max)
        extra = {"arena_run_seconds": secs_a, "arena_run_peak_rss_mb": peak_a / MB}
    return {
        "slide": slide.name, "mask_px": list(mask_shape), "grid_tiles": grid, "kept_tiles": result.n_tiles,
        "tile_path": tile_path, "worker_base_mb": base / MB, "plan_seconds": r["seconds"],
        "plan_peak_rss_mb": plan_peak / MB, "plan_traced_peak_mb": r["traced_peak"] / MB,
        "run_base_mb": run_base / MB, "run_seconds": secs, "tiles_per_s": result.n_tiles / secs,
        "run_peak_rss_mb": run_peak / MB, **extra,
    }


def render(r: dict) -> str:
    rows = r["results"]
    ref = rows[0]["run_peak_rss_mb"]
    lines = [
        "| slide side | mask px | grid tiles | kept tiles | path | worker after imports (MB) | plan s "
        "| plan peak RSS (MB) | plan traced peak (MB) | run s | tiles/s | run peak RSS (MB) | vs smallest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "arena_run_peak_rss_mb" in rows[0]:
        lines[0] += " run peak, MALLOC_ARENA_MAX (MB) | vs smallest |"
        lines[1] += "---|---|"
    for m in rows:
        arena = ""
        if "arena_run_peak_rss_mb" in m:
            a = m["arena_run_peak_rss_mb"]
            arena = f" {a:.0f} | {a / rows[0]['arena_run_peak_rss_mb'] - 1:+.1%} |"
        lines.append(
            f"| {m['size']} | {m['mask_px'][1]}x{m['mask_px'][0]} | {m['grid_tiles']} | {m['kept_tiles']} | "
            f"{m['tile_path']} | {m['worker_base_mb']:.0f} | {m['plan_seconds']:.1f} | {m['plan_peak_rss_mb']:.0f} | "
            f"{m['plan_traced_peak_mb']:.1f} | {m['run_seconds']:.0f} | {m['tiles_per_s']:.0f} | "
            f"{m['run_peak_rss_mb']:.0f} | {m['run_peak_rss_mb'] / ref - 1:+.1%} |" + arena)
    return "\n".join(lines)


def main() -> None:
    from hpcpath.synth import write_synthetic_slide

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/memory")
    ap.add_argument("--sizes", default="20000,50000,100000", help="slide sides in px, comma-separated")
    ap.add_argument("--passthrough", choices=["auto", "never"], default=None,
                    help="override the default for every size")
    ap.add_argument("--tissue-threshold", type=float, default=None, help="override for every size")
    ap.add_argument("--arena-max", type=int, default=None,
                    help="also run each size with MALLOC_ARENA_MAX=N in the worker's environment")
    args = ap.parse_args()
    work = Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    over = {k: v for k, v in (("passthrough", args.passthrough),
                              ("tissue_threshold", args.tissue_threshold)) if v is not None}
    cfg = TileConfig(**over)
    load = os.getloadavg()
    results = []
    for size in sizes:
        p = work / "slides" / f"synth-{size}.svs"
        if not p.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(p, size, size, seed=7)
            print(f"wrote {p} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        m = {"size": size, **measure(p, work, cfg, args.arena_max)}
        print(json.dumps(m), file=sys.stderr)
        results.append(m)
    doc = {"options": over or "defaults", "arena_max": args.arena_max, "load_before": load, "results": results}
    (work / "memory.json").write_text(json.dumps(doc, indent=2))
    print(render(doc))
    print(f"load average before: {load}, at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()

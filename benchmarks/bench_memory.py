"""Worker memory against slide size: peak RSS while tiling 20k, 50k and 100k px synthetic slides.

    flock /tmp/hpcpath-bench.lock .venv/bin/python benchmarks/bench_memory.py --out bench-out/memory [--compare] [--ab 4]

Slides are ``hpcpath.synth.write_synthetic_slide`` (seed 7, 0.5 um/px, 256-px JPEG tiles),
written tile by tile once and kept under OUT/slides for later invocations (20k: ~13 s,
50k: ~100 s, 100k: ~6 min and 3.9 GB on this machine).  Every cluster is the user's: hpcpath's
``local_cluster`` (what ``hpcpath tile --cluster local`` starts: pinning preload, the
workers' malloc environment), one worker with one thread, imports warmed (as a long-lived
cohort worker).  Per size, each phase on a fresh cluster:

  plan   ``plan_slide`` alone as a worker task: the worker's peak RSS while it runs and,
         inside the task, tracemalloc's peak of Python/NumPy allocations;
  run    ``tile_slides`` with the same options: the worker's peak RSS over the whole run
         (plan, tile writes, pyramid; finalize runs here).

Peak RSS is the kernel's ``VmHWM`` of the worker process, reset through
``/proc/PID/clear_refs`` when the phase starts (exact, not sampled).  Options are the same for
every size (default ``TileConfig``; ``--passthrough`` and ``--tissue-threshold`` override it
for all sizes alike).  ``--compare`` repeats each size's run with the malloc settings
undone (**B**: glibc's default arenas, ``MALLOC_ARENA_MAX`` = 8 per core, as before
``hpcpath._malloc.WORKER_ENV``).  ``--ab R``: R alternating rounds of A (defaults)
and B on the smallest slide, both tile paths (passthrough as configured, and ``never``),
tiles/s and kept tiles per worker CPU-second.  The acceptance of issue 12 item 3 is the
run's peak worker RSS at 100k within +-10% of 20k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcpath.config import TileConfig  # noqa: E402

MB = 2**20
GLIBC_ARENAS = str(8 * (os.cpu_count() or 1))  # glibc's default arena limit on 64-bit


def _hwm(reset: bool = False) -> int:
    """On a worker: its peak RSS (VmHWM, bytes); ``reset`` starts a new peak."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu() -> float:
    """On a worker: its CPU seconds, every thread."""
    t = os.times()
    return t.user + t.system


def _cluster(b: bool = False):
    """The user's local cluster, one worker, one thread; ``b``: the malloc settings undone."""
    import dask
    from distributed import Client

    from hpcpath._malloc import arena_count
    from hpcpath.cluster.local import local_cluster
    from hpcpath.cluster.spec import LocalSpec

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    if b:  # a Dask config value wins over hpcpath's worker environment
        env["MALLOC_ARENA_MAX"] = GLIBC_ARENAS
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = local_cluster(LocalSpec(n_workers=1, threads_per_worker=1, memory_limit="8GB"), 1)
    client = Client(cluster)
    arenas = next(iter(client.run(arena_count, 6).values()))
    assert (arenas > 1) if b else (arenas == 1), arenas
    # a cohort run's long-lived workers have their imports done: warm them the same way
    client.run(lambda: [__import__(m) for m in ("hpcpath.tiling", "skimage.morphology",
                                                "scipy.ndimage", "scipy.sparse.csgraph")] and None)
    return cluster, client


def _one(client, fn, *args):
    return next(iter(client.run(fn, *args).values()))


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


def tile_run(slide: Path, work: Path, cfg: TileConfig, b: bool = False) -> dict:
    """tile_slides end to end on a fresh worker: seconds, worker CPU seconds, peak RSS, path."""
    from hpcpath.store import open_store
    from hpcpath.tiling import tile_slides

    out = work / f"run-{slide.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cluster, client = _cluster(b)
    try:
        base = _one(client, _hwm, True)
        cpu0 = _one(client, _cpu)
        t0 = time.perf_counter()
        result = tile_slides([slide], out, cfg, client=client)
        secs = time.perf_counter() - t0
        cpu = _one(client, _cpu) - cpu0
        peak = _one(client, _hwm)
    finally:
        client.close()
        cluster.close()
    assert result.ok, result.records
    st = open_store(next(out.glob("*.zarr")))
    tile_path = (st.metadata.tiling.options.get("tile_path") or {}).get("kind", "?")
    shutil.rmtree(out, ignore_errors=True)
    return {"result": result, "seconds": secs, "cpu": cpu, "base": base, "peak": peak, "path": tile_path}


def measure(slide: Path, work: Path, cfg: TileConfig, compare: bool = False) -> dict:
    from hpcpath.store import open_store

    out = work / f"plan-{slide.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cluster, client = _cluster()
    try:
        base = _one(client, _hwm, True)
        r = client.submit(_plan_task, str(slide), str(out), cfg, pure=False).result()
        plan_peak = _one(client, _hwm)
    finally:
        client.close()
        cluster.close()
    assert "error" not in r["plan"], r["plan"]
    st = open_store(r["plan"]["store"], require_complete=False)
    mask_shape = st.root["tissue/mask"].shape
    grid = st.metadata.tiling.n_grid_tiles
    shutil.rmtree(out, ignore_errors=True)

    run = tile_run(slide, work, cfg)
    n = run["result"].n_tiles
    extra = {}
    if compare:  # the same run with the malloc settings undone
        rb = tile_run(slide, work, cfg, b=True)
        extra = {"b_run_seconds": rb["seconds"], "b_run_peak_rss_mb": rb["peak"] / MB}
    return {
        "slide": slide.name, "mask_px": list(mask_shape), "grid_tiles": grid, "kept_tiles": n,
        "tile_path": run["path"], "worker_base_mb": base / MB, "plan_seconds": r["seconds"],
        "plan_peak_rss_mb": plan_peak / MB, "plan_traced_peak_mb": r["traced_peak"] / MB,
        "run_seconds": run["seconds"], "tiles_per_s": n / run["seconds"],
        "run_peak_rss_mb": run["peak"] / MB, **extra,
    }


def ab(slide: Path, work: Path, cfg: TileConfig, rounds: int) -> dict:
    """Alternating rounds of A (defaults) and B (malloc settings undone), both tile paths."""
    rows = []
    for r in range(rounds):
        for passthrough in (cfg.passthrough, "never"):
            c = cfg.model_copy(update={"passthrough": passthrough})
            for b in ((False, True) if r % 2 == 0 else (True, False)):
                run = tile_run(slide, work, c, b)
                n = run["result"].n_tiles
                row = {"round": r, "passthrough": passthrough, "side": "B" if b else "A", "tiles": n,
                       "path": run["path"], "seconds": run["seconds"], "cpu": run["cpu"],
                       "tiles_per_s": n / run["seconds"], "tiles_per_cpu_s": n / run["cpu"],
                       "peak_rss_mb": run["peak"] / MB}
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return {"slide": slide.name, "rows": rows}


def render(r: dict) -> str:
    rows = r["results"]
    ref = rows[0]["run_peak_rss_mb"]
    lines = [
        "| slide side | mask px | grid tiles | kept tiles | path | worker after imports (MB) | plan s "
        "| plan peak RSS (MB) | plan traced peak (MB) | run s | tiles/s | run peak RSS (MB) | vs smallest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if "b_run_peak_rss_mb" in rows[0]:
        lines[0] += " B: run peak, glibc arenas (MB) | vs smallest |"
        lines[1] += "---|---|"
    for m in rows:
        extra = ""
        if "b_run_peak_rss_mb" in m:
            a = m["b_run_peak_rss_mb"]
            extra = f" {a:.0f} | {a / rows[0]['b_run_peak_rss_mb'] - 1:+.1%} |"
        lines.append(
            f"| {m['size']} | {m['mask_px'][1]}x{m['mask_px'][0]} | {m['grid_tiles']} | {m['kept_tiles']} | "
            f"{m['tile_path']} | {m['worker_base_mb']:.0f} | {m['plan_seconds']:.1f} | {m['plan_peak_rss_mb']:.0f} | "
            f"{m['plan_traced_peak_mb']:.1f} | {m['run_seconds']:.1f} | {m['tiles_per_s']:.0f} | "
            f"{m['run_peak_rss_mb']:.0f} | {m['run_peak_rss_mb'] / ref - 1:+.1%} |" + extra)
    if r.get("ab"):
        lines += ["", "| path | tiles | A tiles/s | B tiles/s | A tiles/CPU-s | B tiles/CPU-s | A/B per CPU-s "
                  "| A peak RSS (MB) | B peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]
        by: dict[tuple[str, str], list[dict]] = {}
        for row in r["ab"]["rows"]:
            by.setdefault((row["path"], row["side"]), []).append(row)
        for path in dict.fromkeys(row["path"] for row in r["ab"]["rows"]):
            a, b = by[(path, "A")], by[(path, "B")]

            def med(rows: list[dict], k: str) -> float:
                return statistics.median(x[k] for x in rows)

            lines.append(
                f"| {path} | {a[0]['tiles']} | {med(a, 'tiles_per_s'):.0f} | {med(b, 'tiles_per_s'):.0f} | "
                f"{med(a, 'tiles_per_cpu_s'):.0f} | {med(b, 'tiles_per_cpu_s'):.0f} | "
                f"{med(a, 'tiles_per_cpu_s') / med(b, 'tiles_per_cpu_s'):.3f} | "
                f"{med(a, 'peak_rss_mb'):.0f} | {med(b, 'peak_rss_mb'):.0f} |")
    return "\n".join(lines)


def main() -> None:
    from hpcpath.synth import write_synthetic_slide

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/memory")
    ap.add_argument("--sizes", default="20000,50000,100000", help="slide sides in px, comma-separated")
    ap.add_argument("--passthrough", choices=["auto", "never"], default=None,
                    help="override the default for every size")
    ap.add_argument("--tissue-threshold", type=float, default=None, help="override for every size")
    ap.add_argument("--compare", action="store_true",
                    help="also run each size with the malloc settings undone (B)")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="throughput: alternating rounds of A and B on the smallest slide, both paths")
    args = ap.parse_args()
    work = Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    over = {k: v for k, v in (("passthrough", args.passthrough),
                              ("tissue_threshold", args.tissue_threshold)) if v is not None}
    cfg = TileConfig(**over)
    load = os.getloadavg()
    results = []
    slides = {}
    for size in sizes:
        p = work / "slides" / f"synth-{size}.svs"
        if not p.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(p, size, size, seed=7)
            print(f"wrote {p} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        slides[size] = p
    if args.ab:
        ab_result = ab(slides[min(sizes)], work, cfg, args.ab)
    for size in sizes:
        m = {"size": size, **measure(slides[size], work, cfg, args.compare)}
        print(json.dumps(m), file=sys.stderr)
        results.append(m)
    doc = {"options": over or "defaults", "compare": args.compare, "load_before": load, "results": results,
           "ab": ab_result if args.ab else None, "load_after": os.getloadavg()}
    (work / "memory.json").write_text(json.dumps(doc, indent=2))
    print(render(doc))
    print(f"load average before: {load}, at the end: {doc['load_after']}")


if __name__ == "__main__":
    main()

"""Scaling: one pinned LocalCluster worker against two, on a cohort, in alternating rounds.

    flock /tmp/hpcpath-bench.lock .venv/bin/python benchmarks/bench_scaling.py --out bench-out
    ... --slides 8 --size 8192 --rounds 3 --passthrough never (the defaults; ~2-3 min)

Slides: ``make_cohort(n=8, 8192 x 8192, seed=0)`` (what ``hpcpath synth -n 8 --size
8192x8192`` writes; shared with bench_cohort.py).  Options: the defaults (256-px tiles,
Blosc-lz4, overview pyramid) with ``--passthrough never`` (the decode path; these synthetic
slides' tiles would otherwise qualify for passthrough) or ``auto``.

Two clusters are started before any timing and stay up (imports warmed by one slide each):
``1w``: one worker pinned to one core (``cores_per_worker: 1``: a worker is a core's worth),
``2w``: two workers, one core each (the LocalSpec default on this 2-core machine).  Each round
runs ``tile_slides()`` over the whole cohort on 1w, then on 2w (then 1w first again...), so
a noisy spell of the shared machine hits both.  Per run: wall seconds, and CPU seconds of the
worker processes and of this process (driver + scheduler, which live here), from /proc.

Efficiency = (2w tiles/s) / (2 x 1w tiles/s), per round (median and best reported), and per
CPU-second rates (tiles per worker CPU-second) to separate the machine's noise from the code.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpcpath.config import TileConfig  # noqa: E402


def _cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def _waited(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a core (/proc schedstat):
    what other processes on the shared machine took from it."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / 1e9


def _io(pid: int) -> tuple[int, int]:
    """(bytes read, bytes written) through system calls by ``pid`` so far (/proc/PID/io)."""
    with open(f"/proc/{pid}/io") as f:
        d = dict(line.split(": ") for line in f.read().splitlines())
    return int(d["rchar"]), int(d["wchar"])


def run_once(client, slides, out: Path, cfg: TileConfig) -> dict:
    from hpcpath.tiling import tile_slides

    shutil.rmtree(out, ignore_errors=True)
    pids = list(client.run(os.getpid).values())
    w0, d0 = sum(_cpu(p) for p in pids), _cpu(os.getpid())
    q0 = sum(_waited(p) for p in pids)
    io0 = [_io(p) for p in [*pids, os.getpid()]]
    from distributed import get_task_stream

    t0 = time.perf_counter()
    with get_task_stream(client) as ts:
        result = tile_slides(slides, out, cfg, client=client)
    secs = time.perf_counter() - t0
    in_task = 0.0  # seconds each worker held a task (CPU or waiting for it): the rest is idle
    for rec in ts.data:
        in_task += sum(s["stop"] - s["start"] for s in rec["startstops"] if s["action"] == "compute")
    w1, d1 = sum(_cpu(p) for p in pids), _cpu(os.getpid())
    q1 = sum(_waited(p) for p in pids)
    io1 = [_io(p) for p in [*pids, os.getpid()]]
    files = sum(len(fs) for _, _, fs in os.walk(out))
    store_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert result.ok and len(result.records) == len(slides), result.records
    return {"tiles": result.n_tiles, "s": secs, "worker_cpu_s": w1 - w0, "driver_cpu_s": d1 - d0,
            "worker_wait_s": q1 - q0, "in_task": in_task / (secs * len(pids)), "read_bytes": sum(b[0] - a[0] for a, b in zip(io0, io1)),
            "written_bytes": sum(b[1] - a[1] for a, b in zip(io0, io1)), "files": files, "out_bytes": store_bytes,
            "source_bytes": sum(Path(s).stat().st_size for s in slides), "busy": (w1 - w0) / (secs * len(pids)),
            "tiles_per_s": result.n_tiles / secs, "tiles_per_worker_cpu_s": result.n_tiles / max(w1 - w0, 1e-9)}


def main() -> None:
    from hpcpath.cluster import cluster_client
    from hpcpath.synth import make_cohort

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passthrough", default="never", choices=["never", "auto"])
    ap.add_argument("--tiles-per-task", type=int, default=None)
    ap.add_argument("--no-pin", action="store_true", help="workers not pinned (the old LocalCluster)")
    args = ap.parse_args()
    work = Path(args.out) / "cohort"
    src = work / f"slides-{args.slides}x{args.size}"
    slides = sorted(src.glob("slide_*.svs"))
    if len(slides) != args.slides:
        shutil.rmtree(src, ignore_errors=True)
        make_cohort(src, n=args.slides, width=args.size, height=args.size, seed=0)
        slides = sorted(src.glob("slide_*.svs"))
    update = {"passthrough": args.passthrough}
    if args.tiles_per_task:
        update["tiles_per_task"] = args.tiles_per_task
    cfg = TileConfig(**update)
    pin = not args.no_pin
    base = {"backend": "local", "dashboard_address": "127.0.0.1:0", "memory_limit": "6GB", "pin_workers": pin}
    load0 = os.getloadavg()
    rounds: list[dict] = []
    with cluster_client({**base, "n_workers": 1, "cores_per_worker": 1}) as c1, \
            cluster_client({**base, "n_workers": 2}) as c2:
        clients = {"1w": c1, "2w": c2}
        affinity = {k: sorted(map(sorted, c.run(lambda: os.sched_getaffinity(0)).values())) for k, c in clients.items()}
        for name, c in clients.items():  # imports and first-task costs, once per worker
            run_once(c, slides[:len(c.scheduler_info()["workers"])], work / f"warm-{name}", cfg)
        for i in range(args.rounds):
            order = ["1w", "2w"] if i % 2 == 0 else ["2w", "1w"]
            r = {k: run_once(clients[k], slides, work / f"run-{k}", cfg) for k in order}
            r["efficiency"] = r["2w"]["tiles_per_s"] / (2 * r["1w"]["tiles_per_s"])
            r["load"] = os.getloadavg()
            print(json.dumps(r), file=sys.stderr)
            rounds.append(r)
    eff = [r["efficiency"] for r in rounds]

    def best(key: str, sub: str) -> float:
        return max(r[key][sub] for r in rounds)

    summary = {
        "slides": args.slides, "size": args.size, "passthrough": args.passthrough, "pinned": pin,
        "tiles_per_task": cfg.tiles_per_task, "tiles": rounds[0]["1w"]["tiles"], "affinity": affinity,
        "cpus": len(os.sched_getaffinity(0)), "load_before": load0, "load_after": os.getloadavg(),
        "efficiency_median": statistics.median(eff), "efficiency_best": max(eff),
        "1w_tiles_per_s_best": best("1w", "tiles_per_s"), "2w_tiles_per_s_best": best("2w", "tiles_per_s"),
        "efficiency_of_best_rates": best("2w", "tiles_per_s") / (2 * best("1w", "tiles_per_s")),
        "1w_tiles_per_worker_cpu_s": statistics.median(r["1w"]["tiles_per_worker_cpu_s"] for r in rounds),
        "2w_tiles_per_worker_cpu_s": statistics.median(r["2w"]["tiles_per_worker_cpu_s"] for r in rounds),
        "1w_driver_cpu_s": statistics.median(r["1w"]["driver_cpu_s"] for r in rounds),
        "1w_worker_wait_s": statistics.median(r["1w"]["worker_wait_s"] for r in rounds),
        "2w_worker_wait_s": statistics.median(r["2w"]["worker_wait_s"] for r in rounds),
        "1w_busy": statistics.median(r["1w"]["busy"] for r in rounds),
        "1w_in_task": statistics.median(r["1w"]["in_task"] for r in rounds),
        "2w_in_task": statistics.median(r["2w"]["in_task"] for r in rounds),
        "2w_busy": statistics.median(r["2w"]["busy"] for r in rounds),
        "2w_driver_cpu_s": statistics.median(r["2w"]["driver_cpu_s"] for r in rounds),
        "per_slide_read_bytes": rounds[0]["1w"]["read_bytes"] / args.slides,
        "per_slide_written_bytes": rounds[0]["1w"]["written_bytes"] / args.slides,
        "per_slide_out_bytes": rounds[0]["1w"]["out_bytes"] / args.slides,
        "per_slide_source_bytes": rounds[0]["1w"]["source_bytes"] / args.slides,
        "files_per_slide": rounds[0]["1w"]["files"] / args.slides,
        "rounds": rounds,
    }
    (work / f"scaling-{args.passthrough}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))


if __name__ == "__main__":
    main()

"""Tiling throughput, scaling, memory and storage, against baselines measured in the same run.

    .venv/bin/python benchmarks/bench_tiling.py --out bench-out            # full (~5 min)
    .venv/bin/python benchmarks/bench_tiling.py --out bench-out --quick    # smaller slides

For each slide (a synthetic Aperio slide and cmu-1-small-region.svs), on the *same* tissue
tiles, one worker process with one thread:

  hpcpath   tile_slides() on a one-worker LocalCluster, timed around the call: planning, tissue
            mask, pyramid, tiles and Zarr writes included (cluster start-up excluded);
  naive     (a) an OpenSlide read_region loop writing each tile to a PNG file;
  floor     (b) decoding the native source tiles the kept tiles cover (each once) and
            encoding the tiles with the store's codec, nothing else.

Then 1 -> 2 worker scaling, peak RSS of the worker for two slide sizes, and bytes per tile
against the source slide's bytes.  The machine is shared and noisy: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _rss import RssSampler  # noqa: E402  (one sampler for every benchmark's worker RSS)

from hpcpath.config import TileConfig  # noqa: E402
from hpcpath.store import open_store  # noqa: E402
from hpcpath.tiling import tile_slides  # noqa: E402

DATA = Path(os.environ.get("HPCPATH_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _cluster(n_workers: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
        memory_limit="8GB", silence_logs=40,
    )
    return cluster, Client(cluster)


def run_hpcpath(slide: Path, out: Path, cfg: TileConfig, n_workers: int = 1, rss: bool = False):
    shutil.rmtree(out, ignore_errors=True)
    cluster, client = _cluster(n_workers)
    try:
        # long-lived workers in a cohort run have their imports done: warm them the same way
        client.run(lambda: __import__("hpcpath.tiling") and __import__("skimage.morphology"))
        sampler = RssSampler(client) if rss else None
        t0 = time.perf_counter()
        if sampler:
            with sampler:
                result = tile_slides([slide], out, cfg, client=client)
        else:
            result = tile_slides([slide], out, cfg, client=client)
        secs = time.perf_counter() - t0
    finally:
        client.close()
        cluster.close()
    assert result.ok, result.records
    return result.n_tiles, secs, (sampler.peak if sampler else None)


def naive_openslide_png(slide: Path, index: np.ndarray, tile: int, limit: int) -> float:
    """(a) read_region per tile, each written out as a PNG file; tiles/s."""
    import openslide

    picks = index[:limit]
    tmp = Path(tempfile.mkdtemp(prefix="hpcpath-naive-"))
    try:
        osr = openslide.OpenSlide(str(slide))
        t0 = time.perf_counter()
        for i, (x, y, level, *_rest) in enumerate(picks):
            img = osr.read_region((int(x), int(y)), int(level), (tile, tile)).convert("RGB")
            img.save(tmp / f"{i}.png")
        secs = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(picks) / secs


def floor_decode_encode(slide: Path, index: np.ndarray, tile: int, codec: str, chunk: int) -> float:
    """(b) decode each native tile under the kept tiles once + encode the tiles; tiles/s."""
    import numcodecs
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        page = tif.pages[0]
        tw, th = page.tilewidth, page.tilelength
        ncols = -(-page.imagewidth // tw)
        needed = set()
        for x, y, *_ in index:
            for ty in range(y // th, (y + tile - 1) // th + 1):
                for tx in range(x // tw, (x + tile - 1) // tw + 1):
                    needed.add(int(ty * ncols + tx))
        fh = tif.filehandle
        raw = []
        for i in sorted(needed):
            fh.seek(page.dataoffsets[i])
            raw.append((i, fh.read(page.databytecounts[i])))
        if codec == "jpeg":
            import imagecodecs

            def encode(a):
                return imagecodecs.jpeg8_encode(a.reshape(-1, tile, 3), level=90, subsampling="444")
        else:
            enc = numcodecs.Blosc(cname=codec.split("-")[1], clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
            encode = enc.encode
        t0 = time.perf_counter()
        decoded = [page.decode(data, i, jpegtables=page.jpegtables)[0][0, :, :, :3] for i, data in raw]
        t_decode = time.perf_counter() - t0
        # chunks of real source pixels to encode (built outside the timing: the floor is strict)
        chunks = []
        for c in range(0, len(index), chunk):
            n = min(chunk, len(index) - c)
            block = np.empty((n, tile, tile, 3), np.uint8)
            for k in range(n):
                src = decoded[(c + k) % len(decoded)]
                block[k] = np.pad(src, ((0, max(0, tile - th)), (0, max(0, tile - tw)), (0, 0)), mode="edge")[:tile, :tile]
            chunks.append(block)
        t0 = time.perf_counter()
        for block in chunks:
            encode(block)
        secs = t_decode + time.perf_counter() - t0
    return len(index) / secs


def tiles_stage_in_process(slide: Path, out: Path) -> float:
    """The tile-writing tasks alone, called in this process (no scheduler, driver or
    pyramid competing for the cores): the pipeline's own cost per tile; tiles/s."""
    from hpcpath.tiling import plan_slide, task_ranges, write_tiles

    shutil.rmtree(out, ignore_errors=True)
    cfg = TileConfig(pyramid=False)
    plan = plan_slide(str(slide), str(out), cfg)
    t0 = time.perf_counter()
    for a, b in task_ranges(plan["n_tiles"], cfg.tiles_per_task):
        write_tiles(str(slide), plan["store"], cfg, a, b)
    return plan["n_tiles"] / (time.perf_counter() - t0)


def store_tile_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "tiles" / "images").rglob("*") if p.is_file())


def bench_slide(name: str, slide: Path, work: Path, naive_limit: int) -> dict:
    cfg = TileConfig()
    out = work / f"out-{name}"
    n, secs, _ = run_hpcpath(slide, out, cfg)
    n_np, secs_np, _ = run_hpcpath(slide, work / f"out-{name}-nopyr", TileConfig(pyramid=False))
    store = open_store(next(out.glob("*.zarr")))
    index = store.index
    rate = n / secs
    stage = tiles_stage_in_process(slide, work / f"out-{name}-stage")
    naive = naive_openslide_png(slide, index, cfg.tile_size, naive_limit)
    floor = floor_decode_encode(slide, index, cfg.tile_size, cfg.codec, cfg.chunk_tiles)
    # storage: bytes per tile, lossless and JPEG, against the source's bytes per tile area
    src_bytes = slide.stat().st_size
    w0, h0 = store.meta["slide"]["level_dimensions"][0]
    src_per_tile = src_bytes * cfg.tile_size**2 / (w0 * h0)
    lz4_per_tile = store_tile_bytes(next(out.glob("*.zarr"))) / n
    jout = work / f"out-{name}-jpeg"
    nj, secs_j, _ = run_hpcpath(slide, jout, TileConfig(codec="jpeg", jpeg_quality=90, pyramid=False))
    jpeg_per_tile = store_tile_bytes(next(jout.glob("*.zarr"))) / nj
    floor_jpeg = floor_decode_encode(slide, index, cfg.tile_size, "jpeg", cfg.chunk_tiles)
    # the same run with the store on tmpfs: what is left when the disk is not the limit
    shm = Path("/dev/shm") / f"hpcpath-bench-{os.getpid()}"
    n_shm, secs_shm, _ = run_hpcpath(slide, shm, cfg) if Path("/dev/shm").is_dir() else (n, secs, None)
    shutil.rmtree(shm, ignore_errors=True)
    return {
        "slide": name,
        "dims": [w0, h0],
        "kept_tiles": n,
        "hpcpath_tiles_per_s": rate,
        "hpcpath_no_pyramid_tiles_per_s": n_np / secs_np,
        "tiles_stage_in_process_tiles_per_s": stage,
        "ratio_tiles_stage_vs_floor": stage / floor,
        "hpcpath_jpeg_no_pyramid_tiles_per_s": nj / secs_j,
        "naive_tiles_per_s": naive,
        "floor_tiles_per_s": floor,
        "hpcpath_tmpfs_tiles_per_s": n_shm / secs_shm,
        "ratio_tmpfs_vs_floor": (n_shm / secs_shm) / floor,
        "floor_jpeg_tiles_per_s": floor_jpeg,
        "ratio_jpeg_no_pyramid_vs_jpeg_floor": (nj / secs_j) / floor_jpeg,
        "ratio_vs_naive": rate / naive,
        "ratio_vs_floor": rate / floor,
        "ratio_no_pyramid_vs_floor": (n_np / secs_np) / floor,
        "source_bytes_per_tile": src_per_tile,
        "blosc_lz4_bytes_per_tile": lz4_per_tile,
        "jpeg90_bytes_per_tile": jpeg_per_tile,
        "lz4_vs_source": lz4_per_tile / src_per_tile,
        "jpeg_vs_source": jpeg_per_tile / src_per_tile,
    }


def main() -> None:
    from hpcpath.synth import write_synthetic_slide

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--quick", action="store_true", help="10k and 20k slides instead of 20k and 50k")
    ap.add_argument("--json", default=None, help="write results here (default OUT/tiling.json)")
    args = ap.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    small, big = (10000, 20000) if args.quick else (20000, 50000)

    slides = {}
    for size in (small, big):
        p = work / "slides" / f"synth-{size}.svs"
        if not p.exists():
            t0 = time.perf_counter()
            write_synthetic_slide(p, size, size, seed=7)
            print(f"wrote {p} in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        slides[size] = p

    results = {"machine": {"cpus": os.cpu_count()}, "slides": [], "scaling": {}, "memory": []}
    for name, path in ((f"synthetic {small}x{small}", slides[small]),
                       ("cmu-1-small-region.svs", DATA / "slides" / "cmu-1-small-region.svs")):
        r = bench_slide(name, path, work, naive_limit=600)
        print(json.dumps(r, indent=1), file=sys.stderr)
        results["slides"].append(r)

    cfg = TileConfig()
    n1, s1, _ = run_hpcpath(slides[small], work / "scale1", cfg, 1)
    n2, s2, _ = run_hpcpath(slides[small], work / "scale2", cfg, 2)
    results["scaling"] = {
        "slide": f"synthetic {small}x{small}", "tiles": n1,
        "w1_tiles_per_s": n1 / s1, "w2_tiles_per_s": n2 / s2,
        "efficiency": (n2 / s2) / (2 * n1 / s1),
    }
    print(json.dumps(results["scaling"]), file=sys.stderr)

    for size in (small, big):
        n, secs, peak = run_hpcpath(slides[size], work / f"mem{size}", cfg, 1, rss=True)
        results["memory"].append({"size": size, "tiles": n, "tiles_per_s": n / secs, "peak_worker_rss_mb": peak / 2**20})
        print(json.dumps(results["memory"][-1]), file=sys.stderr)

    out_json = Path(args.json) if args.json else work / "tiling.json"
    out_json.write_text(json.dumps(results, indent=2))
    print(render(results))


def render(r: dict) -> str:
    lines = [
        "| slide | kept tiles | hpcpath tiles/s | (a) naive tiles/s | (b) floor tiles/s | vs (a) | vs (b) | no pyramid vs (b) | store on tmpfs vs (b) | tile stage in-process vs (b) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["slides"]:
        lines.append(
            f"| {s['slide']} | {s['kept_tiles']} | {s['hpcpath_tiles_per_s']:.0f} | {s['naive_tiles_per_s']:.0f} | "
            f"{s['floor_tiles_per_s']:.0f} | {s['ratio_vs_naive']:.1f}x | {s['ratio_vs_floor']:.2f} | "
            f"{s['ratio_no_pyramid_vs_floor']:.2f} | {s['ratio_tmpfs_vs_floor']:.2f} | {s['ratio_tiles_stage_vs_floor']:.2f} |"
        )
    lines += ["", "| slide | source B/tile | blosc-lz4 B/tile (x source) | jpeg q90 B/tile (x source) | jpeg tiles/s (no pyramid) | jpeg floor tiles/s | ratio |", "|---|---|---|---|---|---|---|"]
    for s in r["slides"]:
        lines.append(
            f"| {s['slide']} | {s['source_bytes_per_tile']:.0f} | {s['blosc_lz4_bytes_per_tile']:.0f} ({s['lz4_vs_source']:.1f}x) | "
            f"{s['jpeg90_bytes_per_tile']:.0f} ({s['jpeg_vs_source']:.1f}x) | {s['hpcpath_jpeg_no_pyramid_tiles_per_s']:.0f} | "
            f"{s['floor_jpeg_tiles_per_s']:.0f} | {s['ratio_jpeg_no_pyramid_vs_jpeg_floor']:.2f} |"
        )
    sc = r["scaling"]
    lines += ["", f"Scaling on {sc['slide']} ({sc['tiles']} tiles): 1 worker {sc['w1_tiles_per_s']:.0f} tiles/s, "
              f"2 workers {sc['w2_tiles_per_s']:.0f} tiles/s, efficiency {sc['efficiency']:.2f}", "",
              "| slide side | tiles | tiles/s | peak worker RSS (MB) |", "|---|---|---|---|"]
    for m in r["memory"]:
        lines.append(f"| {m['size']} | {m['tiles']} | {m['tiles_per_s']:.0f} | {m['peak_worker_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Passthrough stores against the decode path (Blosc-lz4), on the same slide in the same run.

    taskset -c 0 .venv/bin/python benchmarks/bench_passthrough.py --out bench-out               # ~5 min
    taskset -c 0 .venv/bin/python benchmarks/bench_passthrough.py --out bench-out --size 50000  # ~8 min once the slide exists

Slides: a synthetic Aperio-style JPEG slide from ``hpcpath synth`` (``--size``, 256-px tiles,
full JPEG per tile) and the real cmu-1-small-region.svs (240-px tiles sharing one JPEGTables
tag), each tiled at its native tile size so that it qualifies.  For each slide, in
alternating rounds (best round reported; the VM is shared and noisy):

  stage    the tile-writing tasks alone (``write_tiles`` over every task range, in this
           process, after one ``plan_slide``): what passthrough replaces;
  run      ``tile_slides()`` on a one-worker, one-thread LocalCluster (start-up excluded),
           with and without the pyramid: planning, tissue mask, tiles, pyramid, marker;
  inline   ``tile_slides()`` in this process (``InlineBackend``), with the pyramid: what
           ``hpcpath tile ONE_SLIDE`` runs by default.

Run it on one core, as issue 12 measures (``taskset -c 0``: the LocalCluster's worker, the
scheduler and this process then share it; without it the decode path's writer thread
compresses on the second core while the next chunk decodes).

Storage: bytes of the tile array's files (shards / chunks, metadata excluded) against the
source bytes of the same kept tiles (the TIFF tiles' byte counts, plus the JPEGTables tag
once), and against the whole source file.
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

from bench_tiling import DATA, run_hpcpath, store_tile_bytes  # noqa: E402

from hpcpath.config import TileConfig  # noqa: E402


def stage_rate(slide: Path, out: Path, cfg: TileConfig) -> tuple[int, float, dict]:
    """(tiles, tiles/s of the write_tiles tasks, tile_path) for one in-process tiling."""
    import zarr

    from hpcpath.tiling import plan_slide, task_ranges, write_tiles

    shutil.rmtree(out, ignore_errors=True)
    plan = plan_slide(str(slide), str(out), cfg)
    assert "error" not in plan, plan
    t0 = time.perf_counter()
    for a, b in task_ranges(plan["n_tiles"], cfg.tiles_per_task):
        write_tiles(str(slide), plan["store"], cfg, a, b)
    secs = time.perf_counter() - t0
    how = zarr.open_group(plan["store"], mode="r").attrs["hpcpath"]["tiling"]["tile_path"]
    return plan["n_tiles"], plan["n_tiles"] / secs, how


def run_inline(slide: Path, out: Path, cfg: TileConfig) -> tuple[int, float]:
    """(tiles, seconds) of ``tile_slides`` in this process (``InlineBackend``, a thread per
    core of this process's affinity): what ``hpcpath tile ONE_SLIDE`` runs by default
    (``--cluster auto``), no Dask."""
    from hpcpath.backends.inline import InlineBackend
    from hpcpath.tiling import tile_slides

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = tile_slides([slide], out, cfg, client=InlineBackend())
    secs = time.perf_counter() - t0
    assert result.ok, result.records
    return result.n_tiles, secs


def source_tile_bytes(slide: Path, store: Path) -> int:
    """Bytes the source file spends on the store's kept tiles (+ its JPEGTables, once)."""
    import tifffile
    import zarr

    root = zarr.open_group(str(store), mode="r")
    index = root["tiles/index"][:]
    t = root["tiles/images"].shape[1]
    with tifffile.TiffFile(slide) as tif:
        page = next(p for p in tif.pages if p.is_tiled)
        ncols = -(-page.imagewidth // page.tilewidth)
        assert page.tilewidth == t
        total = sum(page.databytecounts[(y // t) * ncols + x // t] for x, y, *_ in index.tolist())
        return int(total) + len(page.jpegtables or b"")


def bench_slide(name: str, slide: Path, tile: int, work: Path, rounds: int) -> dict:
    auto = TileConfig(tile_size=tile, pyramid=False)
    never = TileConfig(tile_size=tile, pyramid=False, passthrough="never")
    best: dict[str, float] = {}

    def keep(key: str, rate: float) -> None:
        best[key] = max(best.get(key, 0.0), rate)

    hows = {}
    for _ in range(rounds):  # alternate, so a noisy spell hits both paths alike
        n, r, hows["auto"] = stage_rate(slide, work / "stage-auto", auto)
        keep("stage_passthrough", r)
        n2, r, hows["never"] = stage_rate(slide, work / "stage-never", never)
        keep("stage_lz4", r)
        assert n == n2
        for label, cfg in (("passthrough", auto), ("lz4", never)):
            for pyr in (False, True):
                k, secs, _ = run_hpcpath(slide, work / f"run-{label}-{pyr}", cfg.model_copy(update={"pyramid": pyr}))
                keep(f"run_{label}{'_pyramid' if pyr else ''}", k / secs)
            k, secs = run_inline(slide, work / f"inline-{label}", cfg.model_copy(update={"pyramid": True}))
            keep(f"inline_{label}_pyramid", k / secs)
    assert hows["auto"]["kind"] == "passthrough" and hows["never"]["kind"] == "decode", hows
    store_pt = next((work / "run-passthrough-False").glob("*.zarr"))
    store_lz4 = next((work / "run-lz4-False").glob("*.zarr"))
    src = source_tile_bytes(slide, store_pt)
    pt_bytes, lz4_bytes = store_tile_bytes(store_pt), store_tile_bytes(store_lz4)
    return {
        "slide": name, "tile": tile, "kept_tiles": n, "format": hows["auto"]["format"],
        **best,
        "stage_ratio": best["stage_passthrough"] / best["stage_lz4"],
        "run_ratio": best["run_passthrough"] / best["run_lz4"],
        "run_pyramid_ratio": best["run_passthrough_pyramid"] / best["run_lz4_pyramid"],
        "inline_pyramid_ratio": best["inline_passthrough_pyramid"] / best["inline_lz4_pyramid"],
        "source_tile_bytes": src, "source_file_bytes": slide.stat().st_size,
        "passthrough_tile_array_bytes": pt_bytes, "lz4_tile_array_bytes": lz4_bytes,
        "passthrough_vs_source": pt_bytes / src, "lz4_vs_source": lz4_bytes / src,
    }


def render(results: list[dict]) -> str:
    lines = [
        "| slide | kept tiles | tile stage: passthrough / lz4 tiles/s | ratio | run (no pyramid): passthrough / lz4 | ratio | run (pyramid): passthrough / lz4 | ratio | one slide in-process (pyramid): passthrough / lz4 | ratio | source B (kept tiles) | passthrough B (x source) | lz4 B (x source) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['slide']} | {r['kept_tiles']} | {r['stage_passthrough']:.0f} / {r['stage_lz4']:.0f} | **{r['stage_ratio']:.1f}x** | "
            f"{r['run_passthrough']:.0f} / {r['run_lz4']:.0f} | **{r['run_ratio']:.1f}x** | "
            f"{r['run_passthrough_pyramid']:.0f} / {r['run_lz4_pyramid']:.0f} | **{r['run_pyramid_ratio']:.1f}x** | "
            f"{r['inline_passthrough_pyramid']:.0f} / {r['inline_lz4_pyramid']:.0f} | **{r['inline_pyramid_ratio']:.1f}x** | "
            f"{r['source_tile_bytes']} | {r['passthrough_tile_array_bytes']} (**{r['passthrough_vs_source']:.3f}x**) | "
            f"{r['lz4_tile_array_bytes']} ({r['lz4_vs_source']:.1f}x) |")
    return "\n".join(lines)


def main() -> None:
    from hpcpath.synth import write_synthetic_slide

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--size", type=int, default=20000, help="synthetic slide side [20000]")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.out) / "passthrough"
    work.mkdir(parents=True, exist_ok=True)
    synth = Path(args.out) / "slides" / f"synth-{args.size}.svs"
    if not synth.exists():  # the same slide bench_tiling.py makes (seed 7)
        write_synthetic_slide(synth, args.size, args.size, seed=7)
    results = [bench_slide(f"synthetic {args.size}x{args.size}", synth, 256, work / "synth", args.rounds),
               bench_slide("cmu-1-small-region.svs", DATA / "slides" / "cmu-1-small-region.svs", 240,
                           work / "cmu", args.rounds)]
    for r in results:
        print(json.dumps(r), file=sys.stderr)
    (work / "passthrough.json").write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()

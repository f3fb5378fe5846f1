"""Centre/fraction labelling cost: one label pixel per tile pixel (the default) against the
old fixed raster of 4 level-0 px, on the same slide and annotations, in one run.

    taskset -c 0 .venv/bin/python benchmarks/bench_labels.py            # ~2 min

A synthetic W x W level-0 grid fully covered by tiles (no slide pixels are read: labelling
needs only the tile index and the annotations), 60 star-shaped tumour regions (a third with
a hole) of radius 200..4000 px written as GeoJSON, labelled by
``hpcpath.dataset.build._region_labels`` (annotation reading, block rasters, summed-area
tables).  Tiled at level 0 (tile px = level-0 px: 16x more label pixels than the old
default) and at downsample 4 (where both rules use the same raster).  The rounds take turns;
each measure reports its best round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def regions(rng, w, n=60, rmin=200, rmax=4000):
    import shapely

    out = []
    for k in range(n):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, w), rng.uniform(rmin, rmax)
        t = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 30))))
        rad = r * rng.uniform(0.3, 1, t.size)
        poly = shapely.Polygon(np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)])
        if k % 3 == 0:
            poly = poly.difference(shapely.Point(cx, cy).buffer(r / 4, 8))
        out += [p for p in shapely.get_parts(shapely.make_valid(poly)) if p.area > 0]
    return out


def write_geojson(path: Path, polys) -> None:
    def ring(c):
        return [[float(x), float(y)] for x, y in np.asarray(c.coords)[:, :2]]

    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [ring(p.exterior),
                                                         *[ring(i) for i in p.interiors]]}}
        for p in polys]}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=40000, help="slide side, level-0 px")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    from hpcpath.config import DatasetConfig
    from hpcpath.dataset.build import _region_labels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ann = out / "bench-labels.geojson"
    write_geojson(ann, regions(np.random.default_rng(1), args.size))
    w = args.size
    cases = {}
    for ds, tile in ((1, 256), (4, 256)):
        side = tile * ds
        y, x = np.mgrid[0:w - side + 1:side, 0:w - side + 1:side]
        index = np.c_[x.ravel(), y.ravel()].astype(np.int64)
        meta = {"slide": {"level_dimensions": [[w, w]]},
                "tiling": {"tile_size": tile, "downsample": ds}}
        for name, ld in (("tile px", None), ("4 level-0 px", 4.0)):
            cases[(ds, name)] = (meta, index, DatasetConfig(label_downsample=ld))
    best = {k: float("inf") for k in cases}
    positives = {}
    for _ in range(args.rounds):
        for key, (meta, index, cfg) in cases.items():
            t = time.perf_counter()
            labels, _, _ = _region_labels(meta, index, [str(ann)], cfg)
            best[key] = min(best[key], time.perf_counter() - t)
            positives[key] = int(labels.sum())
    print(f"slide {w} x {w} level-0 px, 256-px tiles, best of {args.rounds}")
    print("| tile downsample | tiles | label pixel | seconds | positives |")
    print("|---|---|---|---|---|")
    for (ds, name), (_meta, index, _cfg) in cases.items():
        print(f"| {ds} | {len(index)} | {name} | {best[(ds, name)]:.2f} | {positives[(ds, name)]} |")


if __name__ == "__main__":
    main()

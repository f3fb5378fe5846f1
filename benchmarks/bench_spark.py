"""Spark against Dask on the same slides and cores: tiles/s, start-up seconds, inference
windows/s.

    .venv/bin/python benchmarks/bench_spark.py --out bench-spark            # ~5 min
    .venv/bin/python benchmarks/bench_spark.py --out bench-spark --quick    # smaller slides

Both backends get N task slots (default 2): a Dask LocalCluster of N one-thread worker
processes, and Spark ``local[N]`` (one JVM, N Python workers).  Start-up is timed from
nothing to a backend ready for work (Spark: the JVM, the session and a warmed Python worker
per slot; Dask: the cluster and its workers).  Both stay up; each stage is then timed
around the library call (``tile_slides``, ``infer_slides``), alternating backends round by
round (``--rounds``) into fresh folders; the best round of each and, for tiling, the median
round are kept (the machine is shared: compare the ratios).  Tiling: synthetic Aperio
slides, default options (256 px tiles, JPEG passthrough, pyramid).  Inference: a small untrained CNN over the stores' 256-px tiles.
Results: ``OUT/bench_spark.json``.
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

from hpcpath.backends import open_backend  # noqa: E402
from hpcpath.config import InferConfig, TileConfig  # noqa: E402
from hpcpath.infer import infer_slides  # noqa: E402
from hpcpath.synth import make_cohort  # noqa: E402
from hpcpath.tiling import tile_slides  # noqa: E402


def _model(path: Path) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from keras import layers

    from hpcpath.modelio import ModelMeta, save_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((256, 256, 3), dtype="uint8")
    h = layers.AveragePooling2D(4)(layers.Rescaling(1 / 255)(inp))
    for width in (8, 16):
        h = layers.MaxPooling2D(2)(layers.Conv2D(width, 3, activation="relu")(h))
    net = keras.Model(inp, layers.Dense(1, activation="sigmoid")(layers.GlobalAveragePooling2D()(h)))
    return save_model(net, path, ModelMeta(patch_size=256, classes=("Tumor",)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--passthrough", choices=["auto", "never"], default="auto",
                    help="never: decode and re-encode every tile (the path non-JPEG slides take)")
    a = ap.parse_args()
    size = 8192 if a.quick else 16384
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    slides = out / "slides"
    if not slides.exists():
        make_cohort(slides, n=a.slides, width=size, height=size, seed=7)
    model = _model(out / "model")
    specs = {"dask": {"backend": "local", "n_workers": a.slots, "threads_per_worker": 1},
             "spark": {"backend": "spark", "master": f"local[{a.slots}]"}}
    res: dict = {"passthrough": a.passthrough, "slots": a.slots, "slides": a.slides, "size": size, "rounds": a.rounds,
                 "load_avg_start": os.getloadavg()[0]}
    from contextlib import ExitStack

    with ExitStack() as stack:
        backends = {}
        for name, spec in specs.items():
            t0 = time.perf_counter()
            backends[name] = stack.enter_context(open_backend(spec))
            start = time.perf_counter() - t0
            res[name] = {"startup_s": round(start, 2), "tile": [], "infer": []}
            print(f"{name}: started in {start:.1f} s", flush=True)
        for k in range(a.rounds):  # alternate backends, so load changes hit both alike
            for name, backend in backends.items():
                r = res[name]
                dest = out / f"{name}-{k}"
                shutil.rmtree(dest, ignore_errors=True)
                t = time.perf_counter()
                run = tile_slides([slides], dest, TileConfig(passthrough=a.passthrough), client=backend)
                secs = time.perf_counter() - t
                assert run.ok, [x.error for x in run.failed]
                r["tile"].append({"tiles": run.n_tiles, "seconds": round(secs, 2),
                                  "tiles_per_s": round(run.n_tiles / secs, 1)})
                print(f"{name}: tile round {k}: {run.n_tiles} tiles in {secs:.1f} s", flush=True)
            if a.no_infer:
                continue
            for name, backend in backends.items():
                r = res[name]
                pred = out / f"{name}-pred-{k}"
                shutil.rmtree(pred, ignore_errors=True)
                t = time.perf_counter()
                ir = infer_slides([out / f"{name}-{k}"], model, pred,
                                  InferConfig(name="bench", gpu="off"), client=backend)
                secs = time.perf_counter() - t
                assert ir.ok, ir.failed
                r["infer"].append({"windows": ir.windows, "seconds": round(secs, 2),
                                   "windows_per_s": round(ir.windows / secs, 1)})
                print(f"{name}: infer round {k}: {ir.windows} windows in {secs:.1f} s", flush=True)
    for name in specs:
        r = res[name]
        r["best_tiles_per_s"] = max(x["tiles_per_s"] for x in r["tile"])
        r["median_tiles_per_s"] = statistics.median(x["tiles_per_s"] for x in r["tile"])
        if r["infer"]:
            r["best_windows_per_s"] = max(x["windows_per_s"] for x in r["infer"])
    res["tiles_per_s_ratio_spark_over_dask"] = round(res["spark"]["best_tiles_per_s"] / res["dask"]["best_tiles_per_s"], 3)
    res["median_tiles_per_s_ratio_spark_over_dask"] = round(
        res["spark"]["median_tiles_per_s"] / res["dask"]["median_tiles_per_s"], 3)
    if not a.no_infer:
        res["windows_per_s_ratio_spark_over_dask"] = round(
            res["spark"]["best_windows_per_s"] / res["dask"]["best_windows_per_s"], 3)
    res["startup_ratio_spark_over_dask"] = round(res["spark"]["startup_s"] / res["dask"]["startup_s"], 2)
    res["load_avg_end"] = os.getloadavg()[0]
    (out / "bench_spark.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if "ratio" in k or k in ("slots",)}, indent=2))


if __name__ == "__main__":
    main()

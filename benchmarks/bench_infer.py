"""Inference throughput end to end against bare ``model.predict`` on the same tiles, and the
sliding-window detector against the two-stage one on the same slides.

    .venv/bin/python benchmarks/bench_infer.py --out bench-out            # ~6 min on 2 cores
    .venv/bin/python benchmarks/bench_infer.py --out bench-out --quick    # smaller slides
    .venv/bin/python benchmarks/bench_infer.py --out bi12 --only throughput --models pooled_cnn

One Dask worker process with one thread (``LocalCluster(n_workers=1, threads_per_worker=1)``;
TensorFlow in it uses every core, as it would on a node), the model already loaded and traced
in the worker (a warm-up run), as in a long cohort run.  Per model:

  end to end   ``infer_slides`` over the stores, timed on the driver: plan tasks, reading the
               tiles from Zarr on the read-ahead thread, prediction, heatmap writes, the
               finishing task (summary, overlay PNG), completion markers;
  predict      in the same worker process, every one of those tiles already in memory as
               one uint8 array: ``model.predict(x, batch_size=B)``, same model, same batch;
  compiled     the same tiles through the traced call inference uses, batch by batch (the
               compute floor: no input pipeline at all);
  per CPU-s    tiles per CPU-second of driver + worker (end to end) against model.predict's
               per CPU-second of the worker: the ratio to read on a shared, noisy machine;
  outside      each run's wall time minus its prediction tasks' seconds (plan and finishing
               tasks, round trips, driver bookkeeping).

Models: small_cnn (``hpcpath train``), mobilenetv2 and pooled_cnn (random-weight stand-ins:
a heavy backbone, and a CNN as cheap as reading its tile); ``--models`` picks them.

Then the mitosis model over the same slides in both modes: sliding window (stride 16) and
two-stage (colour-deconvolution proposals + candidate patches), with patches classified,
wall time and F1 under the 30 px rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


TRAIN = dict(batch_size=32, val_split=None, model={"architecture": "small_cnn", "width": 16},
             optimizer={"name": "adam", "learning_rate": 0.002},
             augmentation={"brightness": 0.1, "contrast": (0.8, 1.0), "saturation": (0.9, 1.0),
                           "hue": 0.02})


def _fit(ds_path: Path, kind: str, work: Path, client) -> Path:
    """The models a user makes: ``hpcpath train`` on the dataset (its rule sets the task:
    binary for tumour tiles, points for mitoses), plus one ``hpcpath mine`` round for the
    mitosis model (tests/test_mitosis.py's recipe)."""
    from hpcpath.config import TrainConfig
    from hpcpath.train import train

    out = work / "inf-runs-train" / kind
    if kind == "tumor":
        cfg = {**TRAIN, "model": {"architecture": "small_cnn", "width": 8}}  # tests/test_infer.py's
        return train(TrainConfig(dataset=str(ds_path), out=str(out), epochs=12, balance=None, **cfg)).model_dir
    from hpcpath.train.mining import mine_slides

    cfg = TrainConfig(dataset=str(ds_path), out=str(out), epochs=8, balance=None,
                      mining={"oversample": 1}, **TRAIN)
    first = train(cfg)
    res = mine_slides(cfg, first.model_dir, out.with_name("mitosis-round1"), [work / "inf-train"],
                      slide_dirs=[work / "inf-train"], client=client)
    return Path(res["model_dir"])


def _mobilenet(out: Path) -> Path:
    """MobileNetV2 (alpha 0.5, random weights: no download) on 256 px uint8 tiles: a
    throughput stand-in for a heavy backbone (``hpcpath train`` does not build MobileNet, and
    training one here would cost minutes for weights the benchmark never looks at), so its
    metadata is written here -- a binary heatmap model, never a points model."""
    import keras
    from keras import layers

    from hpcpath.modelio import ModelMeta, save_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((256, 256, 3), dtype="uint8")
    h = layers.Rescaling(1 / 127.5, offset=-1)(inp)
    base = keras.applications.MobileNetV2(input_shape=(256, 256, 3), alpha=0.5, include_top=False,
                                          weights=None, pooling="avg")
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid")(base(h)))
    return save_model(model, out, ModelMeta(patch_size=256, classes=("Tumor",), task="binary",
                                            architecture="mobilenetv2_0.5"))


def _pooled_cnn(out: Path) -> Path:
    """The cheap CNN of the earlier tables (4x average pooling, then three conv + pool layers;
    ~0.25 ms per 256 px tile on this CPU), random weights, hand-written binary metadata: a
    model as cheap as reading its tile, where a slide's fixed cost shows most."""
    import keras
    from keras import layers

    from hpcpath.modelio import ModelMeta, save_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((256, 256, 3), dtype="uint8")
    h = layers.AveragePooling2D(4)(layers.Rescaling(1 / 255)(inp))
    for f in (16, 32, 32):
        h = layers.MaxPooling2D(2)(layers.Conv2D(f, 3, activation="relu", padding="same")(h))
    model = keras.Model(inp, layers.Dense(1, activation="sigmoid")(layers.GlobalAveragePooling2D()(h)))
    return save_model(model, out, ModelMeta(patch_size=256, classes=("Tumor",), task="binary",
                                            architecture="pooled_cnn"))


def prepare(work: Path, size: int, n: int, client, parts: tuple[str, ...] = ("throughput", "detection")) -> dict:
    """Slides, stores and the models ``parts`` need (the mitosis model only for detection),
    made once per ``work`` folder; a folder made for another slide size is refused."""
    from hpcpath.config import DatasetConfig, TileConfig
    from hpcpath.dataset import build_dataset
    from hpcpath.synth import make_cohort
    from hpcpath.tiling import tile_slides

    done = work / "infer-prepared.json"
    if done.exists():
        info = json.loads(done.read_text())
        if (info["size"], info["slides"]) != (size, n):
            raise SystemExit(f"{work} holds {info['slides']} x {info['size']} px slides; use another --out")
        if "pooled_cnn" not in info["models"]:
            info["models"]["pooled_cnn"] = str(_pooled_cnn(work / "inf-models" / "pooled"))
            done.write_text(json.dumps(info))
        if "detection" in parts and "mitosis" not in info["models"]:
            info["models"]["mitosis"] = str(_fit(work / "inf-mitosis.json", "mitosis", work, client))
            done.write_text(json.dumps(info))
        return info
    mitoses = max(40, round(40 * (size / 4096) ** 2))  # the test slides' density
    make_cohort(work / "inf-slides", n=n, width=size, height=size, seed=500, n_mitoses=mitoses)
    make_cohort(work / "inf-train", n=2, width=4096, height=4096, seed=600)
    assert tile_slides([work / "inf-slides"], work / "inf-stores", TileConfig(), client=client).ok
    assert tile_slides([work / "inf-train"], work / "inf-train256", TileConfig(), client=client).ok
    assert tile_slides([work / "inf-train"], work / "inf-train64", TileConfig(tile_size=64), client=client).ok
    every = {"fractions": (1.0, 0.0, 0.0)}
    assert build_dataset([work / "inf-train256"], sorted((work / "inf-train").glob("*.tumor.xml")),
                         work / "inf-tumor.json", DatasetConfig(name="tumor", split=every), client=client).ok
    assert build_dataset([work / "inf-train64"], sorted((work / "inf-train").glob("*.mitoses.csv")),
                         work / "inf-mitosis.json",
                         DatasetConfig(name="mitosis", rule="points", classes=("Mitosis",), jitter_px=4,
                                       rotations=4, negatives_per_slide=600, split=every), client=client).ok
    models = {"small_cnn": str(_fit(work / "inf-tumor.json", "tumor", work, client)),
              "mobilenetv2": str(_mobilenet(work / "inf-models" / "mobilenet")),
              "pooled_cnn": str(_pooled_cnn(work / "inf-models" / "pooled"))}
    if "detection" in parts:
        models["mitosis"] = str(_fit(work / "inf-mitosis.json", "mitosis", work, client))
    info = {"size": size, "slides": n, "models": models}
    done.write_text(json.dumps(info))
    return info


def bare_predict(stores: list[str], model_dir: str, batch: int, repeats: int) -> dict:
    """On the worker: every tile of ``stores`` in memory, then model.predict and the
    compiled call, best of ``repeats``."""
    from hpcpath.infer.model import cached_model
    from hpcpath.store import open_store

    lm = cached_model(model_dir)
    x = np.concatenate([open_store(s).tiles[:] for s in stores])
    lm.model.predict(x[: batch * 2], batch_size=batch, verbose=0)  # warm
    best_p = best_c = cpu_p = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        lm.model.predict(x, batch_size=batch, verbose=0)
        best_p = min(best_p, time.perf_counter() - t)
        cpu_p = min(cpu_p, time.process_time() - c)
        t = time.perf_counter()
        for i in range(0, len(x), batch):
            lm.predict(x[i : i + batch], batch)
        best_c = min(best_c, time.perf_counter() - t)
    return {"tiles": len(x), "predict_tps": len(x) / best_p, "compiled_tps": len(x) / best_c,
            "predict_tpcpu": len(x) / cpu_p}


def f1_of(out: Path, slides: Path, n: int) -> float:
    from hpcpath.evaluate.runs import load_detection_sets, score_detections

    ds = load_detection_sets([out], [str(slides / "*.mitoses.csv")])
    return score_detections(ds)["f1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--size", type=int, default=12288)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="6144 px slides, 2 repeats")
    ap.add_argument("--only", choices=["throughput", "detection"], help="run one part")
    ap.add_argument("--models", default="small_cnn,mobilenetv2,pooled_cnn",
                    help="throughput models, comma-separated (small_cnn, mobilenetv2, pooled_cnn)")
    ap.add_argument("--prepare-only", action="store_true", help="make slides, stores and models, measure nothing")
    args = ap.parse_args()
    if args.quick:
        args.size, args.repeats = 6144, 2
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)

    from distributed import Client, LocalCluster

    from hpcpath.config import InferConfig
    from hpcpath.infer import infer_slides

    results: dict = {"batch": args.batch, "repeats": args.repeats}
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, silence_logs=40) as c, Client(c) as cl:
        parts = (args.only,) if args.only else ("throughput", "detection")
        info = prepare(work, args.size, args.slides, cl, parts)
        if args.prepare_only:
            return
        stores = sorted(str(p) for p in (work / "inf-stores").glob("*.zarr"))
        results.update(size=info["size"], slides=len(stores))
        runs = iter(range(10**6))
        token = time.strftime("%H%M%S")  # fresh outputs every invocation: a rerun would skip them

        import psutil

        procs = [psutil.Process()] + [psutil.Process(p) for p in cl.run(os.getpid).values()]
        cpu_s: list[float] = []  # CPU seconds of the last e2e run: driver (+ scheduler) and worker

        def e2e(model: str, cfg: InferConfig) -> tuple[float, list[dict], Path]:
            k = f"{token}-{next(runs)}"
            out = work / "inf-runs" / f"{cfg.name}-{k}"
            c0 = sum(sum(p.cpu_times()[:2]) for p in procs)
            t = time.perf_counter()
            res = infer_slides(stores, model, out, cfg.model_copy(update={"name": f"{cfg.name}-{k}"}),
                               client=cl, slide_dirs=[work / "inf-slides"])
            wall = time.perf_counter() - t
            cpu_s.append(sum(sum(p.cpu_times()[:2]) for p in procs) - c0)
            assert res.ok, res.failed
            return wall, res.rows, out

        thr = {}
        for arch in (args.models.split(",") if args.only != "detection" else ()):
            cfg = InferConfig(name=arch, batch_size=args.batch)
            e2e(info["models"][arch], cfg)  # warm: model loaded and traced in the worker
            walls, cpus, fixed, rows = [], [], [], None
            for _ in range(args.repeats):
                wall, rows, out = e2e(info["models"][arch], cfg)
                walls.append(wall)
                cpus.append(cpu_s[-1])
                from hpcpath.files import read_table

                fixed.append(wall - sum(float(t["seconds"]) for t in read_table(out / "tasks.csv")))
            windows = sum(int(r["windows"]) for r in rows)
            bare = cl.submit(bare_predict, stores, info["models"][arch], args.batch, args.repeats,
                             pure=False).result()
            assert bare["tiles"] == windows
            e2e_tps = windows / min(walls)
            thr[arch] = {"tiles": windows, "e2e_tps": e2e_tps, **bare,
                         "vs_predict": e2e_tps / bare["predict_tps"],
                         "vs_compiled": e2e_tps / bare["compiled_tps"],
                         "e2e_tpcpu": windows / min(cpus),
                         "fixed_s": float(np.median(fixed)),  # wall outside prediction tasks
                         "cpu_vs_predict": windows / min(cpus) / bare["predict_tpcpu"],
                         "io_wait_fraction": float(np.mean([float(r["io_wait_fraction"]) for r in rows]))}
            print(arch, json.dumps(thr[arch]), flush=True)
        results["throughput"] = thr

        det = {}
        modes = (("window", InferConfig(name="mit-win", stride=16, batch_size=256)),
                 ("two-stage", InferConfig(name="mit-two", mode="two-stage", batch_size=256)))
        for mode, cfg in (modes if args.only != "throughput" else ()):
            e2e(info["models"]["mitosis"], cfg.model_copy(update={"name": cfg.name + "-warm"}))
            wall, rows, out = e2e(info["models"]["mitosis"], cfg)
            from hpcpath.files import read_table

            tasks = read_table(out / "tasks.csv")
            patches = sum(int(t["windows"]) for t in tasks) if mode == "window" else \
                sum(int(t["candidates"]) for t in tasks)
            det[mode] = {"seconds": wall, "patches": patches,
                         "predict_s": sum(float(t["predict_s"]) for t in tasks),
                         "task_s": sum(float(t["seconds"]) for t in tasks),
                         "detections": sum(int(r["detections"]) for r in rows),
                         "f1": f1_of(out, work / "inf-slides", len(stores))}
            print(mode, json.dumps(det[mode]), flush=True)
        results["detection"] = det
    (work / f"bench-infer{'-' + args.only if args.only else ''}.json").write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(r: dict) -> str:
    lines = [f"Slides: {r['slides']} synthetic {r['size']}x{r['size']}, batch {r['batch']}, best of {r['repeats']}.", "",
             "| model | tiles | end to end tiles/s | model.predict tiles/s | compiled call tiles/s | vs predict | vs compiled "
             "| per CPU-second: end to end / predict | model waiting on reads | outside prediction tasks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arch, t in r.get("throughput", {}).items():
        lines.append(f"| {arch} | {t['tiles']} | {t['e2e_tps']:.0f} | {t['predict_tps']:.0f} | "
                     f"{t['compiled_tps']:.0f} | {t['vs_predict']:.2f} | {t['vs_compiled']:.2f} | "
                     f"{t['e2e_tpcpu']:.0f} / {t['predict_tpcpu']:.0f} = {t['cpu_vs_predict']:.2f} | "
                     f"{100 * t['io_wait_fraction']:.1f}% | {t['fixed_s']:.2f} s |")
    if not r.get("detection"):
        return "\n".join(lines)
    lines += ["", "| mitosis detector | patches classified | wall s | predict s (tasks) | detections | F1 (30 px rule) |",
              "|---|---|---|---|---|---|"]
    for mode, d in r["detection"].items():
        lines.append(f"| {mode} | {d['patches']} | {d['seconds']:.1f} | {d['predict_s']:.1f} | "
                     f"{d['detections']} | {d['f1']:.3f} |")
    w, t = r["detection"]["window"], r["detection"]["two-stage"]
    lines += ["", f"Two-stage classifies {w['patches'] / max(t['patches'], 1):.1f}x fewer patches and "
              f"finishes {w['seconds'] / t['seconds']:.1f}x sooner."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

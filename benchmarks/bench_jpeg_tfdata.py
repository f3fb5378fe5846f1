"""Training input from passthrough stores: JPEG decode rate inside tf.data against the small
CNN's CPU step rate, and the cores a GPU would need.

    taskset -c 0 .venv/bin/python benchmarks/bench_jpeg_tfdata.py --out bench-out               # one core
    taskset -c 0 .venv/bin/python benchmarks/bench_jpeg_tfdata.py --out bench-out --tile 64     # 64-px patches
    .venv/bin/python benchmarks/bench_jpeg_tfdata.py --out bench-out                # all cores

Data: two 8192^2 synthetic slides (``make_cohort``, seed 30, native JPEG tiles of ``--tile``
px) tiled at that size (``--passthrough auto``: the stores hold the slides' own JPEG tiles),
labelled by ``build_dataset``.  In this process, TensorFlow's pools sized to the CPUs this process may
use, best of ``--rounds`` (measures take turns so a noisy spell on the shared VM hits all),
each as items per wall second and per CPU second of the process (all its threads: what one
core delivers even when other jobs share the machine):

  decode 1 thread   ``imagecodecs.jpeg8_decode`` and ``tf.io.decode_jpeg`` (accurate IDCT) of
                    every stored tile in a loop: the per-core decode rate;
  reader            ``to_tf(decode="reader")``: the NumPy reader decodes (one thread);
  tf.data           ``to_tf(decode="tf")``: stored tiles into tf.data, decoded there by a
                    parallel map (AUTOTUNE);
  tf.data + aug     the same with the default augmentation;
  step              the small CNN's train step (width 16, batch 32, tile-size patches) on one
                    resident batch: the rate the input has to keep up with (in the rounds too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(work: Path, tile: int) -> Path:
    from distributed import Client, LocalCluster

    from hpcpath.config import DatasetConfig, TileConfig
    from hpcpath.dataset import build_dataset
    from hpcpath.synth import make_cohort
    from hpcpath.tiling import tile_slides

    manifest = work / f"bench-jpeg-{tile}.json"
    if manifest.exists():
        return manifest
    slides = work / f"jpeg-slides-{tile}"
    if not slides.exists():  # the slides' own JPEG tiles are `tile` px: passthrough qualifies
        make_cohort(slides, n=2, width=8192, height=8192, seed=30, tile=tile)
    stores = work / f"jpeg-stores-{tile}"
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None, silence_logs=40) as c, Client(c) as cl:
        assert tile_slides([slides], stores, TileConfig(tile_size=tile, pyramid=False), client=cl).ok
        anns = sorted(slides.glob("*.tumor.xml"))
        assert build_dataset([stores], anns, manifest, DatasetConfig(name="bench"), client=cl).ok
    return manifest


def tiles_of(ds) -> list[bytes]:
    out = []
    for s in range(len(ds.stores)):
        r = ds._arrays(s).images
        n = r.array.shape[0]
        for lo in range(0, n, r.rows_per_chunk):
            out += list(r.read_encoded(lo, min(n, lo + r.rows_per_chunk)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tile", type=int, default=256, help="tile (= patch) size [256]; 64 = bench_train's patches")
    args = ap.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare(work, args.tile)

    cpus = len(os.sched_getaffinity(0))
    import imagecodecs
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cpus)
    tf.config.threading.set_inter_op_parallelism_threads(cpus)

    from hpcpath.config import AugmentConfig, ModelConfig, TrainConfig
    from hpcpath.dataset import open_dataset
    from hpcpath.train.engine import SingleEngine
    from hpcpath.train.loop import make_optimizer, make_steps
    from hpcpath.train.models import build_model

    ds = open_dataset(manifest)
    assert ds.encoded_format() == "jpeg", "the stores are not passthrough JPEG stores"
    tiles = tiles_of(ds)
    n = len(ds)

    def timed(fn) -> tuple[float, float]:
        """(items per wall second, items per CPU second of this process, all threads): the
        second is what a core delivers, whatever else shares the machine."""
        w0, c0 = time.perf_counter(), time.process_time()
        k = fn()
        return k / (time.perf_counter() - w0), k / (time.process_time() - c0)

    def rate_loop(fn):
        def run():
            for t in tiles:
                fn(t)
            return len(tiles)
        return timed(run)

    def rate_tf(**kw):
        pipe = ds.to_tf(args.batch, shuffle=True, **kw)
        for _ in pipe.take(2):  # warm: tracing, first reads
            pass
        return timed(lambda: sum(int(x.shape[0]) for x, _ in pipe))

    decode_tf = tf.function(lambda s: tf.io.decode_jpeg(s, channels=3, dct_method="INTEGER_ACCURATE"))
    measures = {
        "decode_imagecodecs_1thread": lambda: rate_loop(imagecodecs.jpeg8_decode),
        "decode_tf_1thread": lambda: rate_loop(lambda t: decode_tf(tf.constant(t))),
        "reader": lambda: rate_tf(decode="reader"),
        "tfdata": lambda: rate_tf(decode="tf"),
        "tfdata_aug": lambda: rate_tf(decode="tf", augment=AugmentConfig()),
    }
    # the small CNN's train step at this patch size, on one resident batch
    cfg = TrainConfig(dataset=str(manifest), out="unused", batch_size=args.batch, balance=None,
                      model=ModelConfig(architecture="small_cnn", width=16))
    engine = SingleEngine().start()
    model = build_model(cfg.model, args.tile, 1)
    opt = make_optimizer(cfg, 1e-3, False)
    opt.build(model.trainable_variables)
    train_step, _ = make_steps(model, opt, engine)
    x, y = next(iter(ds.to_tf(args.batch, shuffle=False)))
    y = tf.reshape(y, (-1, 1))
    for _ in range(3):
        train_step(x, y)

    def step_rate():
        def run():
            for _ in range(5):
                float(train_step(x, y))
            return 5 * args.batch
        return timed(run)

    measures["step_samples_per_s"] = step_rate
    best: dict[str, list[tuple[float, float]]] = {k: [] for k in measures}
    for _ in range(args.rounds):
        for k, fn in measures.items():
            best[k].append(fn())
            print(k, "wall/s {:.1f}  per CPU-s {:.1f}".format(*best[k][-1]), file=sys.stderr)

    r = {k: max(w for w, _ in v) for k, v in best.items()}
    r.update({f"{k}_per_cpu_s": max(c for _, c in v) for k, v in best.items()})
    r.update(tile=args.tile, cpus=cpus, items=n, tiles=len(tiles), load_average=os.getloadavg()[0])
    r["tfdata_vs_step"] = r["tfdata"] / r["step_samples_per_s"]
    r["tfdata_aug_vs_step"] = r["tfdata_aug"] / r["step_samples_per_s"]
    r["tfdata_vs_step_per_cpu_s"] = r["tfdata_per_cpu_s"] / r["step_samples_per_s_per_cpu_s"]
    per_core = r["tfdata_per_cpu_s"]  # the whole input path (read + decode + batch) per core
    r["cores_per_gpu"] = {name: rate / per_core for name, rate in
                          (("V100 fp32 ~390 img/s", 390.0), ("A100 AMP ~2500 img/s", 2500.0))}
    (work / f"jpeg_tfdata_{args.tile}px_{cpus}cpu.json").write_text(json.dumps(r, indent=2))
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

"""Training throughput of the small CNN on CPU: 1 vs 2 Horovod ranks, and the input
pipeline's rate against the step rate.

    .venv/bin/python benchmarks/bench_train.py --out bench-out

In one run (synthetic 4096^2 slides, 64 px patches, batch 32 per rank, width 16):

  horovod-1 / horovod-2   `horovodrun --gloo -np N` training runs; samples/s = global samples
                          per second of the training loop, median over epochs after the first
                          (tracing); input wait = seconds per epoch a rank waited for data;
  pipeline                the rank's input pipeline alone (read shard + tf.data + augmentation),
                          drained as fast as it goes, one process;
  step                    the train step alone on one resident batch, one process.

The pipeline must outrun the step: pipeline samples/s > step samples/s.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PY = sys.executable


def prepare(work: Path) -> Path:
    from distributed import Client, LocalCluster

    from hpcpath.config import DatasetConfig, SplitConfig, TileConfig
    from hpcpath.dataset import build_dataset
    from hpcpath.synth import make_cohort
    from hpcpath.tiling import tile_slides

    manifest = work / "train-bench.json"
    if manifest.exists():
        return manifest
    make_cohort(work / "tr-slides", n=4, width=4096, height=4096, seed=30)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40) as c, Client(c) as cl:
        assert tile_slides([work / "tr-slides"], work / "tr-stores", TileConfig(tile_size=64), client=cl).ok
        anns = sorted((work / "tr-slides").glob("*.tumor.xml"))
        assert build_dataset([work / "tr-stores"], anns, manifest,
                             DatasetConfig(name="tumor", split=SplitConfig(fractions=(0.5, 0.5, 0.0))),
                             client=cl).ok
    return manifest


def config(work: Path, manifest: Path, name: str, epochs: int, batch: int) -> Path:
    import yaml

    doc = {"dataset": str(manifest), "out": str(work / name), "epochs": epochs, "batch_size": batch,
           "balance": None, "model": {"architecture": "small_cnn", "width": 16}, "tensorboard": False,
           "optimizer": {"learning_rate": 0.002, "warmup_epochs": 0.5}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def horovod_run(work: Path, manifest: Path, n: int, epochs: int, batch: int) -> dict:
    cfg = config(work, manifest, f"hvd{n}", epochs, batch)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [str(Path(PY).parent / "horovodrun"), "--gloo", "-np", str(n), "-H", f"localhost:{n}",
           PY, "-m", "hpcpath.cli.main", "train", str(cfg), "--engine", "horovod"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    with open(work / f"hvd{n}" / "history.csv") as f:
        rows = list(csv.DictReader(f))[1:]
    return {"ranks": n, "samples_per_s": statistics.median(float(r["samples_per_s"]) for r in rows),
            "input_wait_s_per_epoch": statistics.median(float(r["input_wait_s"]) for r in rows),
            "epoch_s": statistics.median(float(r["seconds"]) for r in rows),
            "val_auc": float(rows[-1]["val_auc"]), "wall_s": wall}


def pipeline_and_step(manifest: Path, batch: int, steps: int) -> dict:
    """The input pipeline alone and the train step alone, in this process."""
    from hpcpath.config import TrainConfig
    from hpcpath.train.data import open_train_data, rank_batches, tf_batches
    from hpcpath.train.engine import SingleEngine
    from hpcpath.train.loop import make_optimizer, make_steps
    from hpcpath.train.models import build_model

    cfg = TrainConfig(dataset=str(manifest), out="unused", batch_size=batch, balance=None,
                      model={"architecture": "small_cnn", "width": 16})
    data = open_train_data(cfg)
    shard = data.train.shard(0, 2)  # what one of two ranks reads

    def drain(epoch):
        n, t0 = 0, time.perf_counter()
        for _x, y in tf_batches(rank_batches(shard, batch, steps, seed=0, epoch=epoch), data,
                               augment=cfg.augmentation):
            n += int(y.shape[0])
        return n / (time.perf_counter() - t0)

    drain(0)  # warm: tracing, first reads
    pipe = statistics.median(drain(e) for e in (1, 2, 3))
    engine = SingleEngine().start()
    model = build_model(cfg.model, data.patch_size, data.n_outputs)
    opt = make_optimizer(cfg, 1e-3, False)
    opt.build(model.trainable_variables)
    train_step, _ = make_steps(model, opt, engine)
    x, y = next(iter(tf_batches(rank_batches(shard, batch, 1, seed=0, epoch=0), data)))
    for _ in range(5):
        train_step(x, y)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            float(train_step(x, y))
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {"pipeline_samples_per_s": pipe, "step_samples_per_s": statistics.median(rates),
            "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    manifest = prepare(work)
    result = {"horovod": [horovod_run(work, manifest, n, args.epochs, args.batch) for n in (1, 2)]}
    result.update(pipeline_and_step(manifest, args.batch, args.steps))
    h1, h2 = result["horovod"]
    result["speedup_2_ranks"] = h2["samples_per_s"] / h1["samples_per_s"]
    result["pipeline_over_step"] = result["pipeline_samples_per_s"] / result["step_samples_per_s"]
    (work / "bench-train.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

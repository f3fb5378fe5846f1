"""Per-step compute and allreduce time of Horovod ranks across Slurm nodes, and the ring
allreduce cost model fitted to them.

    SLURM_CONF=/var/tmp/hpcpath-slurm2/slurm.conf HPCPATH_INTERFACE=eth0 \\
        .venv/bin/python benchmarks/bench_allreduce.py --out bench-out/allreduce

submits one job per layout to the Slurm of ``SLURM_CONF`` (here the two-node local Slurm:
``bin/local-slurm start --nodes 2``), each launched the way slurm/train.sbatch launches
training (``python -m hpcpath.train.launch``: srun tasks, Gloo rendezvous):

  1 rank        --nodes=1 --ntasks-per-node=1
  2 ranks       --nodes=2 --ntasks-per-node=1   (one per node: every byte crosses nodes)
  4 ranks       --nodes=2 --ntasks-per-node=2

Every rank times, after warm-up, medians over repetitions, ranks synchronised by a barrier:

  compute     forward + backward of the small CNN (batch 32 of 64 px, width 32), no allreduce;
  allreduce   ``hvd.grouped_allreduce`` of that step's gradients (as the train loop does);
  step        compute + allreduce + optimizer update (the loop's real step);
  buffers     ``hvd.allreduce`` of one float32 buffer of 0.4, 4, 16 MB and 102.4 MB (ResNet50's
              25.6 M fp32 gradients), to fit the ring model
              t(B) = 2 (n-1) alpha + 2 (n-1)/n * B / bw.

Results: OUT/allreduce-<n>.json per layout and OUT/summary.json (the table in
docs/benchmarks.md).  CPU-only, on whatever cores the "nodes" share: a measure of the
mechanics and of the per-byte cost of the path between the nodes, not of a real network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LAYOUTS = {1: (1, 1), 2: (2, 1), 4: (2, 2)}  # ranks: (nodes, tasks per node)
BUFFER_FLOATS = (100_000, 1_000_000, 4_000_000, 25_600_000)


# ------------------------------------------------------------------ one rank
def _median_time(fn, reps: int, barrier) -> float:
    times = []
    for _ in range(reps):
        barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(out: Path, reps: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from hpcpath.train.horovod import HorovodEngine

    eng = HorovodEngine("off").start()
    hvd = eng.hvd
    import keras
    import numpy as np
    import tensorflow as tf

    from hpcpath.config import ModelConfig
    from hpcpath.train.models import build_model

    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(architecture="small_cnn", width=32), 64, 1)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(eng.rank)
    x = tf.constant(rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8))
    y = tf.constant(rng.integers(0, 2, (32, 1)).astype("float32"))

    @tf.function
    def grads_fn():
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.binary_crossentropy(y, p))
        return tape.gradient(loss, model.trainable_variables)

    grads = grads_fn()

    @tf.function
    def reduce_graph(gs):  # the gradients as arguments: graph tensors, as in the train step
        return hvd.grouped_allreduce(list(gs), op=hvd.Average)

    def reduce_fn():
        return reduce_graph(grads)

    @tf.function
    def step_fn():
        g = hvd.grouped_allreduce(list(grads_fn()), op=hvd.Average)
        opt.apply(g, model.trainable_variables)

    one = tf.constant([1.0])

    def barrier():
        hvd.allreduce(one, op=hvd.Sum, name="barrier").numpy()

    def run(fn):
        def call():
            r = fn()
            if r is not None:
                tf.nest.map_structure(lambda t: t.numpy(), r)
        return call

    for f in (grads_fn, reduce_fn, step_fn):  # trace and warm up
        run(f)()
        run(f)()
    res = {"ranks": eng.size, "rank": eng.rank, "hosts": [],
           "grad_bytes": int(sum(int(np.prod(g.shape)) * 4 for g in grads)),
        "compute_s": _median_time(run(grads_fn), reps, barrier),
        "allreduce_s": _median_time(run(reduce_fn), reps, barrier),
        "step_s": _median_time(run(step_fn), reps, barrier), "buffers": []}
    for n in BUFFER_FLOATS:
        buf = tf.ones([n], tf.float32)
        hvd.allreduce(buf, op=hvd.Sum, name=f"warm{n}").numpy()
        r = max(3, reps // (1 + n // 1_000_000))
        t = _median_time(lambda buf=buf, n=n: hvd.allreduce(buf, op=hvd.Sum, name=f"buf{n}").numpy(), r, barrier)
        res["buffers"].append({"bytes": 4 * n, "seconds": t})
    from hpcpath.train.logs import gather_json

    res["hosts"] = sorted(set(gather_json(eng, os.uname().nodename)))
    if eng.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"allreduce-{eng.size}.json").write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res), flush=True)
    eng.shutdown()


# ------------------------------------------------------------------ the driver
def submit(out: Path, ranks: int, reps: int, timeout: float) -> dict:
    nodes, per = LAYOUTS[ranks]
    log = out / f"allreduce-{ranks}.log"
    cmd = ["sbatch", "--parsable", "--wait", f"--nodes={nodes}", f"--ntasks-per-node={per}",
           "--cpus-per-task=1", f"--output={log}", f"--chdir={REPO}", "--job-name=bench-allreduce",
           "--wrap", f"{PY} -m hpcpath.train.launch -- {PY} {Path(__file__).resolve()} --worker "
                     f"--out {out} --reps {reps}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"bench_allreduce: {ranks} ranks failed: {proc.stderr}\n"
                         + (log.read_text()[-3000:] if log.exists() else ""))
    return json.loads((out / f"allreduce-{ranks}.json").read_text())


def fit_ring(results: dict[int, dict]) -> dict:
    """Non-negative least squares of t = a * 2(n-1) + B * 2(n-1)/n / bw over every
    (n > 1, buffer)."""
    import numpy as np
    from scipy.optimize import nnls

    rows, ts = [], []
    for n, r in results.items():
        if n < 2:
            continue
        for b in r["buffers"]:
            rows.append([2 * (n - 1), 2 * (n - 1) / n * b["bytes"]])
            ts.append(b["seconds"])
    (alpha, inv_bw), _ = nnls(np.array(rows), np.array(ts))
    return {"alpha_s": float(alpha), "bandwidth_Bps": float(1 / inv_bw) if inv_bw > 0 else float("inf")}


# ------------------------------------------------------------------ the projection
RESNET50_BYTES = 25.6e6 * 4  # fp32 gradients per step
# per-GPU time of one ResNet50 step, batch 64 (assumed from NVIDIA's published training
# throughput, roughly: V100 fp32 ~390 images/s, A100 mixed precision ~2500 images/s)
GPUS = {"V100 fp32": 64 / 390, "A100 AMP": 64 / 2500}


def ring_seconds(n: int, nbytes: float, bw_Bps: float, alpha_s: float) -> float:
    """Ring allreduce: 2(n-1) messages of nbytes/n each way round the ring."""
    return 2 * (n - 1) * alpha_s + 2 * (n - 1) / n * nbytes / bw_Bps


def project(nodes: int = 16, per_node: int = 4, alpha_s: float = 5e-6) -> list[dict]:
    """ResNet50 on nodes x per_node GPUs, one NIC of 100 or 200 Gb/s per node, NVLink
    inside (not the bottleneck): a flat ring laid out node by node crosses each NIC once per
    step each way, so the NIC carries 2(n-1)/n x B, as a ring hop does.  The loop reduces
    after the backward pass (no overlap): efficiency = compute / (compute + allreduce)."""
    n = nodes * per_node
    rows = []
    for gpu, compute in GPUS.items():
        for gbps in (100, 200):
            for grad, nbytes in (("fp32", RESNET50_BYTES), ("fp16", RESNET50_BYTES / 2)):
                t = ring_seconds(n, nbytes, gbps * 1e9 / 8, alpha_s)
                rows.append({"gpu": gpu, "link_Gbps": gbps, "gradients": grad, "compute_ms": 1e3 * compute,
                             "allreduce_ms": 1e3 * t, "efficiency": compute / (compute + t)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/allreduce"))
    ap.add_argument("--ranks", default="1,2,4", help="layouts to run (1, 2, 4)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--project-only", action="store_true", help="print the 16 x 4 GPU projection only")
    ap.add_argument("--from-results", action="store_true", help="summarise OUT/allreduce-*.json again, run nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if a.worker:
        worker(out, a.reps)
        return 0
    if a.project_only:
        _print_projection()
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if a.from_results:
        results = {n: json.loads((out / f"allreduce-{n}.json").read_text()) for n in map(int, a.ranks.split(","))}
    else:
        results = {n: submit(out, n, a.reps, a.timeout) for n in map(int, a.ranks.split(","))}
    summary = {"layouts": results, "ring_fit": fit_ring(results) if len(results) > 1 else None}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'ranks':>5} {'hosts':>8} {'compute ms':>10} {'allreduce ms':>12} {'step ms':>8}  "
          + "  ".join(f"{b // 1_000_000 if b >= 1_000_000 else b / 1e6:g} MB ms" for b in
                      (4 * n for n in BUFFER_FLOATS)))
    for n, r in results.items():
        print(f"{n:>5} {','.join(r['hosts']):>8} {1e3 * r['compute_s']:>10.1f} {1e3 * r['allreduce_s']:>12.1f} "
              f"{1e3 * r['step_s']:>8.1f}  " + "  ".join(f"{1e3 * b['seconds']:>9.1f}" for b in r["buffers"]))
    if summary["ring_fit"]:
        f = summary["ring_fit"]
        print(f"ring fit: alpha {1e6 * f['alpha_s']:.0f} us per hop, bandwidth {8 * f['bandwidth_Bps'] / 1e9:.2f} Gb/s"
              f" (gradient bytes per step: {results[max(results)]['grad_bytes'] / 1e6:.2f} MB)")
    _print_projection()
    return 0


def _print_projection() -> None:
    for nodes in (16, 128):
        print(f"ResNet50, {nodes} nodes x 4 GPUs, ring allreduce of the gradients after the backward pass:")
        print(f"{'GPU':>10} {'link':>8} {'grads':>5} {'compute ms':>10} {'allreduce ms':>12} {'efficiency':>10}")
        for r in project(nodes):
            print(f"{r['gpu']:>10} {r['link_Gbps']:>5} Gb/s {r['gradients']:>5} {r['compute_ms']:>10.1f} "
                  f"{r['allreduce_ms']:>12.1f} {100 * r['efficiency']:>9.0f}%")


if __name__ == "__main__":
    sys.exit(main())

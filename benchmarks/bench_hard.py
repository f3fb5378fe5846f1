"""The baseline on the hard synthetic preset: the demo's small CNN, trained and scored with
CLI commands only, on slides it never saw.

    .venv/bin/python benchmarks/bench_hard.py --out bench-out/hard

Steps (each one ``hpcpath`` command, as a user would type it):

  synth     train and test cohorts, ``--preset hard`` (stain variation, tumour close to stroma,
            blur/fold/pen artefacts, mitosis mimics; a third of the slides normal), two seeds
  tile      both cohorts, 128 px tiles (the demo's), on a LocalCluster
  tumour    ``dataset build`` (centre rule, ASAP XML) -> ``train configs/train-small-cnn.yaml``
            (the demo's 3 epochs) -> ``infer`` heatmaps on the test stores ->
            ``evaluate heatmaps``: tile AUC, slide AUC, FROC
  mitosis   (``--mitosis``) ``dataset build --rule points`` -> ``train`` -> ``infer --mode
            two-stage`` -> ``evaluate detections``: F1 @ 30 px

Numbers go to ``<out>/bench_hard.json`` and are printed as a Markdown table.  Later model and
training work must beat them on the same command (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HP = [sys.executable, "-m", "hpcpath.cli.main"]


def run(*args: str, log: Path) -> str:
    """One CLI step; its output is appended to the log, a failure stops the benchmark."""
    cmd = [*HP, *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    with open(log, "a") as f:
        f.write(f"$ hpcpath {shlex.join(args)}  ({time.perf_counter() - t:.0f} s)\n"
                f"{proc.stdout}{proc.stderr}\n")
    if proc.returncode:
        sys.exit(f"bench_hard: hpcpath {shlex.join(args)} failed (exit {proc.returncode}):\n"
                 f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out/hard", type=Path)
    ap.add_argument("--train-slides", type=int, default=6)
    ap.add_argument("--test-slides", type=int, default=6)
    ap.add_argument("--size", default="8192x8192")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mitosis", action="store_true", help="also the points model (mitosis F1)")
    a = ap.parse_args()
    w = a.out.resolve()
    w.mkdir(parents=True, exist_ok=True)
    log = w / "bench_hard.log"
    log.write_text("")
    t0 = time.perf_counter()
    for name, n, seed in (("train", a.train_slides, 100), ("test", a.test_slides, 200)):
        if not (w / f"{name}-stores").exists():
            run("synth", "-o", str(w / f"{name}-slides"), "-n", str(n), "--size", a.size,
                "--seed", str(seed), "--preset", "hard", log=log)
            run("tile", str(w / f"{name}-slides"), "-o", str(w / f"{name}-stores"),
                "--tile-size", "128", "--cluster", "local", log=log)
    res: dict = {"train_slides": a.train_slides, "test_slides": a.test_slides, "size": a.size,
                 "epochs": a.epochs}
    run("dataset", "build", str(w / "train-stores"), "-a", str(w / "train-slides"),
        "-o", str(w / "tumor.json"), log=log)
    run("train", "configs/train-small-cnn.yaml", "--dataset", str(w / "tumor.json"),
        "-o", str(w / "run"), "--epochs", str(a.epochs), log=log)
    run("infer", "--model", str(w / "run" / "model"), str(w / "test-stores"),
        "-o", str(w / "pred"), log=log)
    run("evaluate", "heatmaps", str(w / "test-stores"), "--name", "model",
        "-t", str(w / "test-slides" / "*.tumor.xml"), "-o", str(w / "eval"), log=log)
    m = json.loads((w / "eval" / "metrics.json").read_text())
    res.update(tile_auc=m["tile_auc"], slide_auc=m["slide_auc"],
               froc=(m.get("froc") or {}).get("score"))
    if a.mitosis:
        res.update(mitosis(w, a, log))
    res["seconds"] = round(time.perf_counter() - t0)
    (w / "bench_hard.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| train / test slides | size | epochs | tile AUC | slide AUC | FROC | mitosis F1 @ 30 px |")
    print("|---|---|---|---|---|---|---|")
    f = (lambda v: "n/a" if v is None else f"{v:.3f}")
    print(f"| {a.train_slides} / {a.test_slides} | {a.size} | {a.epochs} | {f(res['tile_auc'])} | "
          f"{f(res['slide_auc'])} | {f(res['froc'])} | {f(res.get('mitosis_f1'))} |")
    print(f"({res['seconds']} s; log {log})")


def mitosis(w: Path, a, log: Path) -> dict:
    """Points model: dataset -> train -> two-stage detection -> F1 @ 30 px (CLI only)."""
    run("dataset", "build", str(w / "train-stores"), "-a", str(w / "train-slides"),
        "-o", str(w / "mitosis.json"), "--rule", "points", log=log)
    run("train", "configs/train-small-cnn.yaml", "--dataset", str(w / "mitosis.json"),
        "-o", str(w / "run-mitosis"), "--epochs", str(a.epochs), log=log)
    run("infer", "--model", str(w / "run-mitosis" / "model"), str(w / "test-stores"),
        "-o", str(w / "pred-mitosis"), "--mode", "two-stage", log=log)
    run("evaluate", "detections", str(w / "test-stores"), "-t",
        str(w / "test-slides" / "*.mitoses.csv"), "-o", str(w / "eval-mitosis"), log=log)
    m = json.loads((w / "eval-mitosis" / "metrics.json").read_text())
    return {"mitosis_f1": m.get("f1"), "mitosis_best": m.get("best")}


if __name__ == "__main__":
    main()

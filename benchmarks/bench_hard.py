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
  mitosis   its own smaller cohorts (hard, 4096^2, tiled at 64 px) -> ``dataset build --rule
            points`` -> ``train`` (8 epochs) -> one ``mine`` round -> ``infer --mode
            two-stage`` -> ``evaluate detections``: F1 @ 30 px (the recipe of
            tests/test_mitosis.py, on the hard preset)

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
    ap.add_argument("--parts", default="tumour,mitosis",
                    help="comma-separated: tumour (tile/slide AUC, FROC), mitosis (F1)")
    ap.add_argument("--mitosis-slides", type=int, default=3, help="per cohort, 4096^2")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    w = a.out.resolve()
    w.mkdir(parents=True, exist_ok=True)
    log = w / "bench_hard.log"
    with open(log, "a") as f:  # appended: runs of single parts keep each other's output
        f.write(f"# bench_hard.py --parts {a.parts}  {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    t0 = time.perf_counter()
    res: dict = {"train_slides": a.train_slides, "test_slides": a.test_slides, "size": a.size,
                 "epochs": a.epochs}
    if "tumour" in parts:
        res.update(tumour(w, a, log))
    if "mitosis" in parts:
        res.update(mitosis(w, a, log))
    res["seconds"] = round(time.perf_counter() - t0)
    (w / "bench_hard.json").write_text(json.dumps(res, indent=2) + "\n")
    f = (lambda v: "n/a" if v is None else f"{v:.3f}")  # noqa: E731
    print("| tumour: train / test slides | tile AUC | slide AUC | FROC | mitosis: train / test "
          "slides | F1 @ 30 px | best-threshold F1 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.train_slides} / {a.test_slides} ({a.size}, {a.epochs} epochs) | "
          f"{f(res.get('tile_auc'))} | {f(res.get('slide_auc'))} | {f(res.get('froc'))} | "
          f"{a.mitosis_slides} / {a.mitosis_slides} (4096x4096) | {f(res.get('mitosis_f1'))} | "
          f"{f(res.get('mitosis_best_f1'))} |")
    print(f"({res['seconds']} s; log {log})")


def tumour(w: Path, a, log: Path) -> dict:
    """The demo's recipe: 128 px tiles, centre labels from the XML, the small CNN, heatmaps."""
    for name, n, seed in (("train", a.train_slides, 100), ("test", a.test_slides, 200)):
        if not (w / f"{name}-stores").exists():
            run("synth", "-o", str(w / f"{name}-slides"), "-n", str(n), "--size", a.size,
                "--seed", str(seed), "--preset", "hard", log=log)
            run("tile", str(w / f"{name}-slides"), "-o", str(w / f"{name}-stores"),
                "--tile-size", "128", "--cluster", "local", log=log)
    run("dataset", "build", str(w / "train-stores"), "-a", str(w / "train-slides"),
        "-o", str(w / "tumor.json"), log=log)
    run("train", "configs/train-small-cnn.yaml", "--dataset", str(w / "tumor.json"),
        "-o", str(w / "run"), "--epochs", str(a.epochs), log=log)
    run("infer", "--model", str(w / "run" / "model"), str(w / "test-stores"),
        "-o", str(w / "pred"), log=log)
    run("evaluate", "heatmaps", str(w / "test-stores"), "--name", "tumor",
        "-t", str(w / "test-slides" / "*.tumor.xml"), "-o", str(w / "eval"), log=log)
    m = json.loads((w / "eval" / "metrics.json").read_text())
    return {"tile_auc": m["tile_auc"], "slide_auc": m["slide_auc"],
            "froc": (m.get("froc") or {}).get("score")}


MITOSIS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train-tupac-mitosis.yaml"


def mitosis(w: Path, a, log: Path) -> dict:
    """Points model (tests/test_mitosis.py's recipe): dataset -> train -> one mining round ->
    two-stage detection on unseen slides -> F1 @ 30 px, CLI only."""
    m = w / "mitosis"
    m.mkdir(exist_ok=True)
    n = str(a.mitosis_slides)
    for name, seed in (("train", 400), ("test", 300)):
        if not (m / f"{name}64").exists():
            run("synth", "-o", str(m / name), "-n", n, "--size", "4096x4096", "--seed", str(seed),
                "--preset", "hard", log=log)
            run("tile", str(m / name), "-o", str(m / f"{name}64"), "--tile-size", "64",
                "--workers", "1", log=log)
    (m / "dataset.yaml").write_text("split: {fractions: [1.0, 0.0, 0.0]}\n")
    run("dataset", "build", str(m / "train64"), "-a", str(m / "train"), "--rule", "points",
        "--class", "Mitosis", "--name", "mitosis", "--jitter", "4", "--rotations", "4",
        "--negatives-per-slide", "600", "--config", str(m / "dataset.yaml"),
        "-o", str(m / "mitosis.json"), "--workers", "1", log=log)
    ds = str(m / "mitosis.json")
    run("train", str(MITOSIS_CONFIG), "--dataset", ds, "-o", str(m / "run"), log=log)
    run("mine", str(MITOSIS_CONFIG), "--dataset", ds, "--model", str(m / "run" / "model"),
        "-a", str(m / "train"), "--slides", str(m / "train"), "-o", str(m / "round1"), "--workers", "1", log=log)
    run("infer", "--model", str(m / "round1" / "train" / "model"), str(m / "test"),
        "--mode", "two-stage", "-o", str(m / "inf"), "--workers", "1", log=log)
    run("evaluate", "detections", str(m / "inf"), "-t", str(m / "test" / "*.mitoses.csv"),
        "-o", str(m / "ev"), log=log)
    ev = json.loads((m / "ev" / "metrics.json").read_text())
    return {"mitosis_f1": ev.get("f1"), "mitosis_best_f1": (ev.get("best") or {}).get("f1"),
            "mitosis_slides": a.mitosis_slides}


if __name__ == "__main__":
    main()

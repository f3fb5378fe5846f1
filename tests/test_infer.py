"""Inference end to end with real parts: synthetic slides with planted tumour and mitoses,
small CNNs trained on them as a user trains them (dataset build, train, one mining
round; no model metadata written by hand), a real Dask
LocalCluster, and a real Slurm with two fake GPUs (dask-jobqueue workers, scancel, sbatch).

Acceptance: tile AUC >= 0.95 against the planted tumour mask; mitosis F1 under the 30 px
rule >= 0.8 for the two-stage detector and >= 0.6 for the sliding window (the GAP-pooled
``small_cnn`` that ``hpcpath train`` builds places peaks less sharply than the two-stage
detector's centred candidates); GeoJSON in QuPath's shape,
restarts skip or redo the right slides, Slurm runs pin one GPU per task and equal a
LocalCluster run, also when a worker job is cancelled mid-run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpcpath.config import DatasetConfig, InferConfig, TileConfig
from hpcpath.infer import infer_slides, open_predictions
from hpcpath.synth import load_truth, make_cohort
from hpcpath.tiling import tile_slides

REPO = Path(__file__).resolve().parents[1]
HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
N_SLIDES = 4
# every test here needs the trained models (dataset build, train, a mining round: minutes)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def run_cli(*args, timeout=600, **kw):
    return subprocess.run([*HPCPATH, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- fixtures
# The models are made as a user makes them: ``hpcpath dataset build`` then ``hpcpath train``
# (library calls), and for mitoses one ``hpcpath mine`` round; the saved model's task
# (binary / points) comes from the dataset's rule, not from metadata written here.
TRAIN = dict(batch_size=32, val_split=None, model={"architecture": "small_cnn", "width": 16},
             optimizer={"name": "adam", "learning_rate": 0.002},
             augmentation={"brightness": 0.1, "contrast": (0.8, 1.0), "saturation": (0.9, 1.0),
                           "hue": 0.02})


def _train(ds_path: Path, out: Path, models: Path, name: str, **cfg) -> Path:
    from hpcpath.config import TrainConfig
    from hpcpath.train import train

    res = train(TrainConfig(dataset=str(ds_path), out=str(out), **{**TRAIN, **cfg}))
    dest = models / name  # the folder name is the default prediction name
    shutil.copytree(res.model_dir, dest)
    return dest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, dask_client):
    """4 slides to predict (stores at 256 px), 2 other slides to train on, two models."""
    from hpcpath.config import TrainConfig
    from hpcpath.dataset import build_dataset
    from hpcpath.train.mining import mine_slides

    root = tmp_path_factory.mktemp("infer")
    make_cohort(root / "slides", n=N_SLIDES, width=4096, height=4096, seed=300)
    make_cohort(root / "train", n=2, width=4096, height=4096, seed=400)
    assert tile_slides([root / "slides"], root / "stores", TileConfig(), client=dask_client).ok
    assert tile_slides([root / "train"], root / "train256", TileConfig(), client=dask_client).ok
    assert tile_slides([root / "train"], root / "train64", TileConfig(tile_size=64), client=dask_client).ok
    every = {"fractions": (1.0, 0.0, 0.0)}  # both training slides in the train split
    res = build_dataset([root / "train256"], sorted((root / "train").glob("*.tumor.xml")),
                        root / "tumor.json", DatasetConfig(name="tumor", split=every), client=dask_client)
    assert res.ok
    res = build_dataset([root / "train64"], sorted((root / "train").glob("*.mitoses.csv")),
                        root / "mitosis.json",
                        DatasetConfig(name="mitosis", rule="points", classes=("Mitosis",),
                                      jitter_px=4, rotations=4, negatives_per_slide=600, split=every),
                        client=dask_client)
    assert res.ok
    # 151 tiles of 256 px: every item each epoch and enough steps (~50) for BatchNorm's moving
    # statistics to settle (after 8 steps the model inverts its scores in inference mode)
    tumor = _train(root / "tumor.json", root / "runs" / "tumor", root / "models", "tumor",
                   epochs=12, balance=None, model={"architecture": "small_cnn", "width": 8})
    assert json.loads((tumor / "hpcpath-model.json").read_text())["task"] == "binary"
    cfg = dict(TRAIN, dataset=str(root / "mitosis.json"), out=str(root / "runs" / "mitosis"),
               epochs=8, balance=None, mining={"oversample": 1})
    from hpcpath.train import train

    first = train(TrainConfig(**cfg))
    mined = mine_slides(TrainConfig(**cfg), first.model_dir, root / "runs" / "round1",
                        [root / "train"], slide_dirs=[root / "train"], client=dask_client)
    shutil.copytree(mined["model_dir"], root / "models" / "mitosis")
    meta = json.loads((root / "models" / "mitosis" / "hpcpath-model.json").read_text())
    assert meta["task"] == "points" and meta["classes"] == ["Mitosis"]
    return root


def _copy_stores(cohort: Path, dest: Path) -> Path:
    shutil.copytree(cohort / "stores", dest)
    return dest


MITOSIS_WINDOW = InferConfig(name="mitosis", stride=16, windows_per_task=4000)
MITOSIS_TWO_STAGE = InferConfig(name="mitosis2", mode="two-stage")


@pytest.fixture(scope="module")
def tumour_run(cohort, dask_client, tmp_path_factory):
    out = tmp_path_factory.mktemp("tumour-run")
    res = infer_slides([cohort / "stores"], cohort / "models" / "tumor", out,
                       InferConfig(name="tumor"), client=dask_client)
    assert res.ok, [(r["slide_id"], r.get("error")) for r in res.failed]
    return out


@pytest.fixture(scope="module")
def mitosis_runs(cohort, dask_client, tmp_path_factory):
    """Sliding window and two-stage runs of the mitosis model over the 4 slides (LocalCluster);
    the reference every Slurm run is compared to."""
    outs = {}
    for cfg in (MITOSIS_WINDOW, MITOSIS_TWO_STAGE):
        out = tmp_path_factory.mktemp(cfg.name)
        res = infer_slides([cohort / "stores"], cohort / "models" / "mitosis", out, cfg,
                           client=dask_client, slide_dirs=[cohort / "slides"])
        assert res.ok, res.failed
        outs[cfg.name] = out
    return outs


# ----------------------------------------------------------------------------- tumour heatmaps
def test_tumour_heatmaps_recover_the_planted_regions(cohort, tumour_run):
    import tifffile
    from sklearn.metrics import roc_auc_score

    ys, ss = [], []
    for i in range(N_SLIDES):
        p = open_predictions(cohort / "stores" / f"slide_{i:03d}.zarr", "tumor")
        heat = p.heatmap[:]
        rc = p.windows
        assert heat.shape == (1, p.grid.rows, p.grid.cols) and p.info["source"] == "tiles"
        predicted = np.zeros(heat.shape[1:], bool)
        predicted[rc[:, 0], rc[:, 1]] = True
        assert np.isfinite(heat[0][predicted]).all() and np.isnan(heat[0][~predicted]).all()
        with tifffile.TiffFile(cohort / "slides" / f"slide_{i:03d}.tumor.tif") as tif:
            planted = tif.pages[0].asarray()
        c = p.grid.centres(rc).astype(int)  # the planted mask at each window's centre
        ys.append(planted[c[:, 1], c[:, 0]] > 0)
        ss.append(p.window_scores())
        s = ss[-1].astype(np.float64)
        row = {r["slide_id"]: r for r in csv.DictReader(open(tumour_run / "summary.csv"))}[f"slide_{i:03d}"]
        assert float(row["max_prob"]) == pytest.approx(s.max(), rel=1e-5)
        assert float(row["mean_prob"]) == pytest.approx(s.mean(), rel=1e-5)
        assert float(row["topk_mean"]) == pytest.approx(np.sort(s)[-10:].mean(), rel=1e-5)
        from PIL import Image

        with Image.open(tumour_run / f"slide_{i:03d}.overlay.png") as im:
            assert im.mode == "RGB" and max(im.size) <= 1024
    y, s = np.concatenate(ys), np.concatenate(ss)
    assert 0 < y.sum() < len(y)
    auc = roc_auc_score(y, s)
    assert auc >= 0.95, auc


def test_evaluate_heatmaps_cli_matches_sklearn(cohort, tumour_run, tmp_path):
    from sklearn.metrics import roc_auc_score

    truth = [str(cohort / "slides" / f"slide_{i:03d}.tumor.xml") for i in range(N_SLIDES)]
    args = ["evaluate", "heatmaps", cohort / "stores", "--name", "tumor", "-o", tmp_path / "ev"]
    for t in truth:
        args += ["-t", t]
    proc = run_cli(*args)
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(tmp_path / "ev" / "windows.csv")))
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    assert abs(m["tile_auc"] - roc_auc_score(y, s)) <= 1e-9
    assert m["tile_auc"] >= 0.95
    assert m["froc"]["score"] > 0.5 and m["slide_auc"] is None  # every slide has tumour
    assert (tmp_path / "ev" / "roc.png").exists() and (tmp_path / "ev" / "froc.png").exists()


# ----------------------------------------------------------------------------- mitoses
def _independent_f1(pred: list[np.ndarray], truth: list[np.ndarray], radius: float) -> float:
    """Optimal matching by scipy's assignment on the full distance matrix (no shared code)."""
    from scipy.optimize import linear_sum_assignment

    tp = fp = fn = 0
    for p, t in zip(pred, truth):
        if len(p) == 0 or len(t) == 0:
            fp, fn = fp + len(p), fn + len(t)
            continue
        d = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
        r, c = linear_sum_assignment(np.where(d <= radius, d - 1e6, 0.0))
        hits = int((d[r, c] <= radius).sum())
        tp, fp, fn = tp + hits, fp + len(p) - hits, fn + len(t) - hits
    return 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("name,min_f1", [("mitosis", 0.6), ("mitosis2", 0.8)])
def test_mitosis_detections_reach_f1(cohort, mitosis_runs, name, min_f1, tmp_path):
    out = mitosis_runs[name]
    preds, truths = [], []
    for i in range(N_SLIDES):
        rows = list(csv.DictReader(open(out / f"slide_{i:03d}.detections.csv")))
        preds.append(np.array([[float(r["x"]), float(r["y"])] for r in rows]).reshape(-1, 2))
        truths.append(load_truth(cohort / "slides" / f"slide_{i:03d}.svs").mitoses)
    f1 = _independent_f1(preds, truths, 30 * 0.25 / 0.5)  # 30 px at 0.25 um/px; slides at 0.5
    assert f1 >= min_f1, f1
    proc = run_cli("evaluate", "detections", out, "-t", str(cohort / "slides" / "*.mitoses.csv"),
                   "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["f1"] == pytest.approx(f1, abs=1e-12) and m["slides"][0]["radius_px"] == 15.0
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert all(int(r["detections"]) == len(p) for r, p in zip(summary, preds))
    assert all(float(r["detections_per_mm2"]) > 0 and int(r["hpf10_max"]) > 0 for r in summary)
    assert all(r["task"] == "points" and r["proliferation_score"] in ("1", "2", "3") for r in summary)


def test_two_stage_classifies_far_fewer_patches(mitosis_runs):
    win = list(csv.DictReader(open(mitosis_runs["mitosis"] / "tasks.csv")))
    two = list(csv.DictReader(open(mitosis_runs["mitosis2"] / "tasks.csv")))
    windows = sum(int(r["windows"]) for r in win)
    candidates = sum(int(r["candidates"]) for r in two)
    assert 0 < candidates * 5 < windows


def test_geojson_has_qupaths_feature_shape_and_matches_the_csv(cohort, mitosis_runs):
    from hpcpath.annotations import read_annotations

    out = mitosis_runs["mitosis2"]
    for i in range(N_SLIDES):
        doc = json.loads((out / f"slide_{i:03d}.detections.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
        rows = list(csv.DictReader(open(out / f"slide_{i:03d}.detections.csv")))
        assert len(doc["features"]) == len(rows) > 0
        for f, r in zip(doc["features"], rows):
            assert set(f) == {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
            uuid.UUID(f["id"])
            g = f["geometry"]
            assert g["type"] == "Point" and len(g["coordinates"]) == 2
            assert all(isinstance(v, float | int) for v in g["coordinates"])
            assert g["coordinates"] == pytest.approx([float(r["x"]), float(r["y"])], abs=0.01)
            p = f["properties"]
            assert p["objectType"] == "annotation"
            assert p["classification"]["name"] == r["class"] == "Mitosis"
            assert len(p["classification"]["color"]) == 3
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in p["classification"]["color"])
            assert 0.5 <= p["measurements"]["score"] <= 1.0
        ann = read_annotations(out / f"slide_{i:03d}.detections.geojson")  # our QuPath reader
        assert [(round(q.x, 2), round(q.y, 2)) for q in ann.points] == \
               [(float(r["x"]), float(r["y"])) for r in rows]


def test_rerun_skips_complete_slides_and_redoes_partial_ones(cohort, dask_client, tmp_path):
    stores = _copy_stores(cohort, tmp_path / "stores")
    model = cohort / "models" / "tumor"
    cfg = InferConfig(name="t", windows_per_task=30)
    first = infer_slides([stores], model, tmp_path / "out", cfg, client=dask_client)
    assert first.ok and not any(r["reused"] for r in first.rows)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")}
    heat1 = open_predictions(stores / "slide_001.zarr", "t").heatmap[:]
    again = infer_slides([stores], model, tmp_path / "out", cfg, client=dask_client)
    assert all(r["reused"] for r in again.rows) and again.windows == 0
    # slide_001: a run killed before its completion marker; slide_002: an output file lost
    g = zarr.open_group(str(stores / "slide_001.zarr"), mode="r+")["predictions/t"]
    info = dict(g.attrs["hpcpath_predictions"])
    g.attrs["hpcpath_predictions"] = {**info, "complete": False}
    (tmp_path / "out" / "slide_002.overlay.png").unlink()
    third = infer_slides([stores], model, tmp_path / "out", cfg, client=dask_client)
    redone = sorted(r["slide_id"] for r in third.rows if not r["reused"])
    assert redone == ["slide_001", "slide_002"] and third.ok
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.png")} == before
    np.testing.assert_array_equal(open_predictions(stores / "slide_001.zarr", "t").heatmap[:], heat1)
    # another config is another result: redone, not reused
    fourth = infer_slides([stores], model, tmp_path / "out", cfg.model_copy(update={"tta": True}),
                          client=dask_client)
    assert not any(r["reused"] for r in fourth.rows)


def test_tta_averages_the_eight_dihedral_predictions(cohort):
    from hpcpath.detect import dihedral
    from hpcpath.infer.model import cached_model

    lm = cached_model(cohort / "models" / "mitosis")
    x = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    direct = [lm.model.predict(np.ascontiguousarray(dihedral(x, k)), verbose=0) for k in range(8)]
    np.testing.assert_allclose(lm.predict(x, 8, tta=True), np.mean(direct, 0), atol=1e-6)
    np.testing.assert_allclose(lm.predict(x, 8), direct[0], atol=1e-6)
    assert len({dihedral(x, k).tobytes() for k in range(8)}) == 8
    assert cached_model(cohort / "models" / "mitosis") is lm  # loaded once per process


def test_slides_are_tiled_first_and_cli_reports_one_line_errors(cohort, tmp_path):
    model = cohort / "models" / "tumor"
    bad = tmp_path / "bad-model"
    shutil.copytree(model, bad)
    (bad / "model.keras").write_bytes(b"not a keras file")
    slide = cohort / "slides" / "slide_000.svs"
    # a slide file in, and a missing store: the slide is tiled and predicted, the other fails
    proc = run_cli("infer", "--model", model, slide, tmp_path / "nope.zarr", "-o", tmp_path / "o1",
                   "--workers", "1")
    _no_traceback(proc)
    assert proc.returncode == 1
    assert f"hpcpath: {tmp_path / 'nope.zarr'}: no such slide store" in proc.stderr.splitlines()
    assert (tmp_path / "o1" / "stores" / "slide_000.zarr").is_dir()
    assert (tmp_path / "o1" / "slide_000.overlay.png").exists()
    # a corrupt model file: one line per slide naming it, exit 1
    proc = run_cli("infer", "--model", bad, tmp_path / "o1" / "stores", "-o", tmp_path / "o2",
                   "--workers", "1")
    _no_traceback(proc)
    lines = [ln for ln in proc.stderr.splitlines() if "cannot load model" in ln]
    assert proc.returncode == 1 and len(lines) == 1 and str(bad / "model.keras") in lines[0]
    # usage errors: exit 2, one line
    proc = run_cli("infer", "--model", cohort / "models" / "mitosis", tmp_path / "o1" / "stores",
                   "-o", tmp_path / "o1", "--workers", "1")
    _no_traceback(proc)
    assert proc.returncode == 2 and "holds the outputs of predictions 'tumor'" in proc.stderr
    for args, text in (
        (["--model", tmp_path / "missing"], "no hpcpath-model.json"),
        (["--model", model, "--mode", "two-stage"], "two-stage detection needs a points model"),
        (["--model", model, "--batch-size", "0"], "batch_size"),
        (["--model", model, "--config", tmp_path / "nope.yaml"], "config file not found"),
    ):
        proc = run_cli("infer", *args, tmp_path / "o1" / "stores", "-o", tmp_path / "o3", "--workers", "1")
        _no_traceback(proc)
        assert proc.returncode == 2, (args, proc.stderr)
        err = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcpath: error:")]
        assert len(err) == 1 and text in err[0], proc.stderr


# ----------------------------------------------------------------------------- Slurm
def _same_outputs(a: Path, b: Path, stores_a: Path, stores_b: Path, name_a: str, name_b: str,
                  points: bool = True) -> None:
    for i in range(N_SLIDES):
        sid = f"slide_{i:03d}"
        pa = open_predictions(stores_a / f"{sid}.zarr", name_a)
        pb = open_predictions(stores_b / f"{sid}.zarr", name_b)
        if pa.heatmap is not None:
            np.testing.assert_array_equal(pa.heatmap[:], pb.heatmap[:])
        np.testing.assert_array_equal(pa.detections, pb.detections)
        files = [f"{sid}.overlay.png"] + ([f"{sid}.detections.csv", f"{sid}.detections.geojson"] if points else [])
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    cols = ("slide_id", "status", "windows", "tasks", "max_prob", "detections", "detections_per_mm2", "hpf10_max")
    ra = [{c: r[c] for c in cols} for r in csv.DictReader(open(a / "summary.csv"))]
    rb = [{c: r[c] for c in cols} for r in csv.DictReader(open(b / "summary.csv"))]
    assert ra == rb


def _slurm_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(
        "cluster:\n  backend: slurm\n  gpus_per_job: 1\n  jobs: 2\n  cores: 1\n  memory: 3GB\n"
        f"  walltime: '00:15:00'\n  python: {sys.executable}\n  log_directory: {tmp_path / 'logs'}\n"
        "  worker_timeout: 120\n")
    return cfg


def test_infer_on_slurm_pins_one_gpu_per_task_and_equals_local(local_slurm, cohort, mitosis_runs, tmp_path):
    _copy_stores(cohort, tmp_path / "stores")
    c = MITOSIS_WINDOW
    proc = run_cli("infer", "--model", cohort / "models" / "mitosis", tmp_path / "stores",
                   "-o", tmp_path / "out", "--cluster", _slurm_config(tmp_path), "--wait-workers", 2,
                   "--name", c.name, "--stride", c.stride, "--windows-per-task", c.windows_per_task,
                   "--slides", cohort / "slides")
    _no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    tasks = list(csv.DictReader(open(tmp_path / "out" / "tasks.csv")))
    assert len(tasks) > N_SLIDES  # several tasks per slide
    assert all(t["cuda_visible_devices"] in ("0", "1") for t in tasks)  # exactly one GPU each
    assert len({t["slurm_job_id"] for t in tasks}) == 2  # two Slurm-launched workers
    pairs = {(t["slurm_job_id"], t["cuda_visible_devices"]) for t in tasks}
    assert len(pairs) == 2 and {d for _, d in pairs} == {"0", "1"}  # one GPU per worker job
    _same_outputs(tmp_path / "out", mitosis_runs[c.name], tmp_path / "stores", cohort / "stores",
                  c.name, c.name)


def test_scancel_of_a_worker_job_mid_run_still_gives_identical_outputs(local_slurm, cohort, mitosis_runs, tmp_path):
    from hpcpath.cluster import cluster_client, parse_cluster_spec

    stores = _copy_stores(cohort, tmp_path / "stores")
    spec = parse_cluster_spec(_slurm_config(tmp_path))
    result: list = []
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=120)
        jobs = client.run(lambda: os.environ["SLURM_JOB_ID"])
        assert len(set(jobs.values())) == 2

        def work():
            result.append(infer_slides([stores], cohort / "models" / "mitosis", tmp_path / "out",
                                       MITOSIS_WINDOW, client=client, slide_dirs=[cohort / "slides"]))

        th = threading.Thread(target=work)
        th.start()
        killed = victim = None
        deadline = time.monotonic() + 180
        while killed is None and th.is_alive() and time.monotonic() < deadline:
            for addr, keys in client.processing().items():
                running = [str(k) for k in keys if str(k).startswith("predict-slide")]
                if running and addr in jobs:
                    killed, victim = jobs[addr], running[0]  # predict-<slide>/<task>/<run>
                    subprocess.run(["scancel", killed], check=True, timeout=30)
                    break
            time.sleep(0.05)
        th.join(timeout=600)
        assert killed is not None, "no prediction task was seen running"
        # the job really died (a replacement job may have joined since: the job count is kept)
        assert killed not in set(client.run(lambda: os.environ["SLURM_JOB_ID"]).values())
    res = result[0]
    assert res.ok, [(r["slide_id"], r.get("error")) for r in res.failed]
    tasks = list(csv.DictReader(open(tmp_path / "out" / "tasks.csv")))
    sid, k = victim.split("-", 1)[1].split("/")[:2]
    (redone,) = [t for t in tasks if t["slide_id"] == sid and t["task"] == k]
    assert redone["slurm_job_id"] not in ("", killed)  # the interrupted task ran again elsewhere
    assert all(t["cuda_visible_devices"] in ("0", "1") for t in tasks)
    _same_outputs(tmp_path / "out", mitosis_runs[MITOSIS_WINDOW.name], stores, cohort / "stores",
                  MITOSIS_WINDOW.name, MITOSIS_WINDOW.name)


def _sbatch_and_wait(args: list[str], timeout: float = 300, **kw) -> tuple[str, str]:
    """Submit, then poll ``scontrol`` twice a second (``sbatch --wait`` polls with growing
    sleeps, adding up to half a minute); returns (JobState, ExitCode)."""
    sub = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True,
                         timeout=60, check=True, **kw)
    job = sub.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True,
                             text=True, timeout=30).stdout
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        if fields.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None):
            return fields["JobState"], fields.get("ExitCode", "")
        time.sleep(0.5)
    subprocess.run(["scancel", job], timeout=30)
    raise AssertionError(f"Slurm job {job} did not finish within {timeout} s")


def test_sbatch_infer_script_pins_workers_and_equals_local(local_slurm, cohort, tumour_run, tmp_path):
    _copy_stores(cohort, tmp_path / "stores")
    env = {**os.environ, "HPCPATH_PYTHON": sys.executable, "HPCPATH_DASHBOARD": "127.0.0.1:0"}
    state, exit_code = _sbatch_and_wait(
        ["--ntasks=2", "--gres=gpu:2", "--cpus-per-task=1", "--mem-per-cpu=2G",
         f"--output={tmp_path}/job.log", str(REPO / "slurm" / "infer.sbatch"),
         "--model", str(cohort / "models" / "tumor"), str(tmp_path / "stores"), "-o",
         str(tmp_path / "out"), "--name", "tumor"], env=env, cwd=tmp_path)
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert (state, exit_code) == ("COMPLETED", "0:0"), log
    assert "4 predicted" in log and "dashboard http://127.0.0.1:" in log
    tasks = list(csv.DictReader(open(tmp_path / "out" / "tasks.csv")))
    assert {t["cuda_visible_devices"] for t in tasks} <= {"0", "1"}
    by_worker = {}
    for t in tasks:
        by_worker.setdefault(t["worker"], set()).add(t["cuda_visible_devices"])
    assert all(len(v) == 1 for v in by_worker.values())  # each worker kept its one GPU
    _same_outputs(tmp_path / "out", tumour_run, tmp_path / "stores", cohort / "stores", "tumor",
                  "tumor", points=False)

"""Training, for real: the small CNN on synthetic slide patches under every engine — one
process, `horovodrun --gloo -np 2`, `sbatch slurm/train.sbatch` on the local Slurm (Horovod
over srun + Gloo, and tf.distribute) — plus multi-label, resume after SIGKILL, hard-negative
mining and one-line errors for bad input.  No mocks: real ranks, real sbatch, real files.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, missing_resource

from hpcpath.config import DatasetConfig, SplitConfig, TileConfig, TrainConfig
from hpcpath.dataset import build_dataset, build_image_dataset, open_dataset

PY = sys.executable


def env(**extra) -> dict:
    """The environment now (fixtures such as local_slurm set SLURM_CONF), TF kept quiet."""
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", **extra}

BASE = {"epochs": 4, "batch_size": 32, "model": {"architecture": "small_cnn", "width": 16},
        "optimizer": {"learning_rate": 0.002, "warmup_epochs": 0.5}, "seed": 0}


# ------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def patches(tmp_path_factory, dask_client) -> Path:
    """Four 4096^2 synthetic slides, 64 px tiles labelled by the planted tumour (centre
    rule), split 2 train / 2 val slides.  About 10 s."""
    from hpcpath.synth import make_cohort
    from hpcpath.tiling import tile_slides

    root = tmp_path_factory.mktemp("train")
    make_cohort(root / "slides", n=4, width=4096, height=4096, seed=30)
    res = tile_slides([root / "slides"], root / "stores", TileConfig(tile_size=64), client=dask_client)
    assert res.ok
    anns = sorted((root / "slides").glob("*.tumor.xml"))
    built = build_dataset([root / "stores"], anns, root / "tumor.json",
                          DatasetConfig(name="tumor", split=SplitConfig(fractions=(0.5, 0.5, 0.0))),
                          client=dask_client)
    assert built.ok
    counts = open_dataset(root / "tumor.json").class_counts()
    assert counts["train"]["positive"] > 100 and counts["val"]["positive"] > 100
    return root / "tumor.json"


def config(tmp: Path, name: str, dataset: Path, **kw) -> Path:
    doc = {**BASE, "dataset": str(dataset), "out": str(tmp / name), **kw}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train": doc}))
    return path


def hpcpath(*args, timeout=300, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "hpcpath.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env(), **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _num(v: str):
    try:
        return float(v) if "." in v or "e" in v or v == "nan" else int(v)
    except ValueError:
        return v


def audit(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / "audit" / f"rank-{rank}.jsonl").read_text().splitlines()]


def assert_learned(run: Path, min_auc: float = 0.95) -> list[dict]:
    h = history(run)
    assert h[-1]["loss"] < h[0]["loss"], [r["loss"] for r in h]
    assert h[-1]["val_auc"] >= min_auc, [r["val_auc"] for r in h]
    for col in ("val_precision", "val_recall", "val_f1", "val_max_f1", "val_max_f1_threshold", "lr"):
        assert col in h[-1]
    return h


def assert_two_ranks_in_step(run: Path, cfg_path: Path) -> None:
    """Identical weights on both ranks after every step, different batches, disjoint shards
    whose union is the epoch's item table."""
    a0, a1 = audit(run, 0), audit(run, 1)
    assert len(a0) == len(a1) > 0
    for r0, r1 in zip(a0, a1):
        assert r0["step"] == r1["step"]
        assert r0["weights"] == r1["weights"], f"ranks diverged at step {r0['step']}"
        assert r0["data"] != r1["data"], f"ranks read the same batch at step {r0['step']}"
    assert len({r["weights"] for r in a0}) == len(a0)  # and the weights do change every step

    from hpcpath.train.data import epoch_items, open_train_data, subset

    cfg = TrainConfig.load(cfg_path)
    train = open_train_data(cfg).train
    for epoch in range(cfg.epochs):
        s0, s1 = (np.load(run / "audit" / f"rank-{r}-epoch-{epoch}.npy") for r in (0, 1))
        k0, k1 = ({tuple(x) for x in s.tolist()} for s in (s0, s1))
        assert k0 and k1 and not (k0 & k1)
        ep = subset(train, epoch_items(train.labels, cfg.balance, cfg.seed, epoch))
        assert k0 | k1 == set(zip(ep.store_of.tolist(), ep.item.tolist()))


# ------------------------------------------------------------------ engines
@pytest.fixture(scope="module")
def single_run(patches, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    cfg = config(tmp, "run", patches)
    proc = hpcpath("train", cfg)
    return tmp / "run", cfg, proc


@pytest.mark.slow
def test_single_engine_learns_the_planted_tumour(single_run):
    run, _cfg, proc = single_run
    h = assert_learned(run)
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert h[-1]["step"] == 4 * h[0]["step"]
    assert "val_auc" in proc.stderr and "Traceback" not in proc.stderr
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # the saved model follows the inference contract: uint8 in, probabilities out
    from hpcpath.modelio import load_model

    model, meta = load_model(run / "model")
    assert meta.patch_size == 64 and meta.task == "binary" and meta.inputs == ("main",)
    assert meta.architecture == "small_cnn" and meta.extra["metrics"]["val_auc"] >= 0.95
    x = np.zeros((2, 64, 64, 3), np.uint8)
    p = np.asarray(model(x))
    assert p.shape == (2, 1) and ((p >= 0) & (p <= 1)).all()


def _horovodrun() -> str:
    exe = Path(PY).parent / "horovodrun"
    check = subprocess.run([PY, "-c", "import horovod.tensorflow as h; assert h.gloo_built()"],
                           capture_output=True, env=env())
    if not exe.exists() or check.returncode:
        missing_resource("Horovod is not built into this environment: run bin/build-horovod")
    return str(exe)


@pytest.mark.slow
def test_horovodrun_two_ranks_stay_in_step_on_disjoint_shards(patches, tmp_path):
    hvd = _horovodrun()
    # no plateau halving in 4 epochs, so the last epoch's rate shows the scaling alone
    cfg = config(tmp_path, "hvd", patches, audit=True,
                 optimizer={**BASE["optimizer"], "plateau_patience": 10})
    proc = subprocess.run([hvd, "--gloo", "-np", "2", "-H", "localhost:2", PY, "-m", "hpcpath.cli.main",
                           "train", str(cfg), "--engine", "horovod"],
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "hvd"
    h = assert_learned(run)
    assert h[-1]["lr"] == pytest.approx(2 * 0.002)  # learning rate scaled by the 2 ranks
    assert_two_ranks_in_step(run, cfg)
    # rank 0 alone writes logs, checkpoints and the model
    assert (run / "history.csv").exists() and (run / "model" / "model.keras").exists()


def _sbatch(cfg: Path, out: Path, launcher: str, *extra) -> str:
    proc = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", "--gres=gpu:2",
                           f"--output={out}", str(REPO / "slurm" / "train.sbatch"), str(cfg), *extra],
                          capture_output=True, text=True, timeout=400, cwd=REPO, env=env(HPCPATH_PYTHON=PY, HPCPATH_LAUNCHER=launcher))
    log = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    return log


@pytest.mark.slow
def test_sbatch_horovod_two_tasks_one_gpu_each(patches, tmp_path, local_slurm):
    _horovodrun()
    cfg = config(tmp_path, "sb", patches, audit=True)
    log = _sbatch(cfg, tmp_path / "job.out", "gloo")
    assert "2 Horovod ranks on 1 node(s)" in log
    run = tmp_path / "sb"
    assert_learned(run)
    assert_two_ranks_in_step(run, cfg)
    # each task pinned to the fake GPU of its local rank
    assert {audit(run, r)[0]["gpu"] for r in (0, 1)} == {"0", "1"}
    assert [audit(run, r)[0]["gpu"] for r in (0, 1)] == ["0", "1"]


@pytest.mark.slow
def test_tf_distribute_under_srun_trains_the_same_config(patches, tmp_path, local_slurm):
    cfg = config(tmp_path, "tfd", patches, audit=True)
    _sbatch(cfg, tmp_path / "job.out", "tf-distribute")
    run = tmp_path / "tfd"
    assert_learned(run)
    assert_two_ranks_in_step(run, cfg)


# ------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_after_kill_continues_the_step_count(patches, tmp_path, single_run):
    cfg = config(tmp_path, "res", patches, checkpoint_every_steps=5)
    run = tmp_path / "res"
    proc = subprocess.Popen([PY, "-m", "hpcpath.cli.main", "train", str(cfg)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state, deadline = None, time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:  # kill mid-epoch 1 or later
            latest = run / "checkpoints" / "latest"
            if latest.exists():
                try:
                    state = json.loads((run / "checkpoints" / latest.read_text().strip() / "state.json").read_text())
                except (OSError, ValueError):
                    state = None
                if state and state["epoch"] >= 1 and state["step_in_epoch"] > 0:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = state["global_step"]
    assert not (run / "model").exists()

    res = hpcpath("train", cfg, "--resume")
    assert f"step {killed_at})" in res.stderr  # "resuming from ... (epoch E, step S)"
    h = history(run)
    ref = history(single_run[0])
    assert [r["epoch"] for r in h] == [0, 1, 2, 3]
    assert [r["step"] for r in h] == [r["step"] for r in ref]  # the step count went on
    assert h[-1]["val_auc"] >= 0.95 and abs(h[-1]["val_auc"] - ref[-1]["val_auc"]) < 0.03
    assert (run / "model" / "model.keras").exists()


# ------------------------------------------------------------------ mining, two phases, SGD
@pytest.mark.slow
def test_hard_negative_mining_oversamples_into_the_next_round(patches, tmp_path, single_run):
    run0, cfg0, _ = single_run
    hard = tmp_path / "hard.json"
    proc = hpcpath("mine", cfg0, "--model", run0 / "model", "-o", hard, "--threshold", "0.05")
    doc = json.loads(hard.read_text())
    assert doc["format"] == "hpcpath-hard-negatives/1" and doc["items"], proc.stderr
    assert all(s >= 0.05 for _slide, _item, s in doc["items"])
    # they are train negatives, and exactly those the model scores >= threshold
    from hpcpath.modelio import load_model
    from hpcpath.train.data import open_train_data, subset

    data = open_train_data(TrainConfig.load(cfg0))
    model, _ = load_model(run0 / "model")
    neg = np.flatnonzero(data.train.labels == 0)
    sub = subset(data.train, neg)
    scores = np.concatenate([np.asarray(model(b.images))[:, 0] for b in sub.batches(256)])
    keys = np.argsort(sub.store_of.astype(np.int64) * (1 << 32) + sub.chunk, kind="stable")
    expected = {(data.train.slide_ids[int(sub.store_of[i])], int(sub.item[i]))
                for i, s in zip(keys, scores) if s >= 0.05}
    got = {(slide, item) for slide, item, _ in doc["items"]}
    assert len(got ^ expected) <= max(2, len(expected) // 50)  # float noise at the threshold

    # next round: two phases (head, then fine-tune) with SGD + Nesterov, hard negatives
    # oversampled 3x, and in-training mining after epoch 0
    cfg = config(tmp_path, "round2", patches, epochs=2, head_epochs=1, audit=True,
                 fine_tune_learning_rate=0.01, hard_negatives=str(hard),
                 optimizer={"name": "sgd", "learning_rate": 0.05, "warmup_epochs": 0},
                 mining={"enabled": True, "start_epoch": 1, "threshold": 0.5, "oversample": 3})
    hpcpath("train", cfg)
    h = history(tmp_path / "round2")
    assert [r["phase"] for r in h] == ["head", "finetune"]
    assert h[0]["lr"] == pytest.approx(0.05) and h[1]["lr"] == pytest.approx(0.01)
    assert "hard_negatives" in h[0]
    items = np.load(tmp_path / "round2" / "audit" / "rank-0-epoch-0.npy")
    slide_index = {s: i for i, s in enumerate(data.train.slide_ids)}
    seen = {}
    for s, i in items.tolist():
        seen[(s, i)] = seen.get((s, i), 0) + 1
    for slide, item, _ in doc["items"]:
        assert seen.get((slide_index[slide], item), 0) >= 3


# ------------------------------------------------------------------ multi-label
CXR_CLASSES = ["Atelectasis", "Effusion", "Mass", "Nodule"]
CXR_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
              "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
              "OriginalImagePixelSpacing[x", "y]"]


def cxr_with_signals(root: Path, n: int = 480, size: int = 32, seed: int = 0) -> None:
    """A ChestX-ray14-style folder whose findings are learnable: finding k brightens its own
    quadrant of an otherwise noisy grey image; each finding present in ~30% of images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    h = size // 2
    for i in range(n):
        img = rng.normal(100, 25, (size, size)).clip(0, 255)
        found = [c for c in CXR_CLASSES if rng.random() < 0.3]
        for c in found:
            k = CXR_CLASSES.index(c)
            y0, x0 = (k // 2) * h, (k % 2) * h
            img[y0 + 3 : y0 + h - 3, x0 + 3 : x0 + h - 3] += 60
        name = f"{i:08d}_000.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / name)
        rows.append([name, "|".join(found) or "No Finding", 0, i, 50, "F", "PA", size, size, 0.14, 0.14])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CXR_HEADER)
        w.writerows(rows)


@pytest.mark.slow
def test_multilabel_chestxray_reports_per_class_auc(tmp_path, dask_client):
    cxr_with_signals(tmp_path)
    manifest = build_image_dataset(tmp_path / "Data_Entry_2017.csv", tmp_path / "images",
                                   tmp_path / "cxr", size=32, classes=CXR_CLASSES, client=dask_client)
    cfg = config(tmp_path, "ml", manifest, epochs=6, balance=None, batch_size=32,
                 augmentation={"rotate90": False, "flip": False, "hue": 0.0,
                               "saturation": [1.0, 1.0], "brightness": 0.05, "contrast": [0.9, 1.0]},
                 optimizer={"learning_rate": 0.003, "warmup_epochs": 0.5})
    hpcpath("train", cfg)
    last = history(tmp_path / "ml")[-1]
    per_class = [last[f"val_auc_{c}"] for c in CXR_CLASSES]
    assert np.mean(per_class) >= 0.9, per_class
    assert last["val_auc"] == pytest.approx(np.mean(per_class))
    meta = json.loads((tmp_path / "ml" / "model" / "hpcpath-model.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == CXR_CLASSES


# ------------------------------------------------------------------ bad input
def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcpath: error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_configs_fail_in_one_line(tmp_path, patches):
    def run(doc, *args):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({"train": {"dataset": str(patches), "out": str(tmp_path / "o"), **doc}}))
        return hpcpath("train", p, *args, check=False, timeout=120)

    _one_line_error(run({"epoch": 3}), "train.epoch", "did you mean 'epochs'")
    _one_line_error(run({"optimizer": {"learnin_rate": 0.1}}), "train.optimizer.learnin_rate", "learning_rate")
    _one_line_error(run({"epochs": "many"}), "train.epochs", "integer")
    _one_line_error(run({"batch_size": [1]}), "train.batch_size")
    _one_line_error(run({}, "-s", "model.architecture=vgg"), "model.architecture")
    _one_line_error(run({}, "-s", "noequals"), "KEY=VALUE")
    _one_line_error(run({"model": {"weights": str(tmp_path / "nope.h5")}}), "model.weights", "not found")
    _one_line_error(run({"dataset": str(tmp_path / "missing.json")}), "dataset", "not found")
    _one_line_error(run({"classes": ["Tumor", "Necrosis"]}), "'Necrosis' is not a label column")


def test_empty_dataset_and_missing_label_column_fail_in_one_line(tmp_path, patches):
    empty = tmp_path / "empty.json"
    doc = json.loads(patches.read_text())
    doc["slides"] = []
    empty.write_text(json.dumps(doc))
    p = config(tmp_path, "e", empty)
    _one_line_error(hpcpath("train", p, check=False, timeout=120), "no items in split 'train'")
    p = config(tmp_path, "m", patches, classes=["Effusion"])
    _one_line_error(hpcpath("train", p, check=False, timeout=120), "'Effusion' is not a label column")


@pytest.mark.slow
def test_mismatched_weights_file_fails_in_one_line(tmp_path, patches):
    import keras

    from hpcpath.config import ModelConfig
    from hpcpath.train.models import build_model

    other = build_model(ModelConfig(width=8), 64, 1)  # a different small_cnn backbone
    w = tmp_path / "other.weights.h5"
    other.get_layer("backbone_main").save_weights(w)
    del keras
    p = config(tmp_path, "w", patches, model={"architecture": "small_cnn", "width": 16, "weights": str(w)})
    _one_line_error(hpcpath("train", p, check=False, timeout=120), "does not match the small_cnn backbone")

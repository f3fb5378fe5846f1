"""The GPU decision (hpcpath.gpu): GPUs given but TensorFlow sees none is a one-line error
(``gpu: require``), a warning and a CPU run (``prefer``), or a CPU run on purpose (``off``).

As a pure function over every case, then for real: this machine's TensorFlow is the CPU
build, and the local Slurm's fake GPUs (``--gres=gpu:1``: CUDA_VISIBLE_DEVICES set) are
"devices present, TensorFlow sees none" -- ``hpcpath train`` under ``srun`` with ``--gpu``
and ``HPCPATH_GPU`` overrides.  The fake-GPU training runs use ``prefer``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cli_dataset

from hpcpath.config import InferConfig, TrainConfig
from hpcpath.errors import ConfigError
from hpcpath.gpu import GpuFacts, decide, setting_from_env, visible_ids

PY = sys.executable
CPU_BUILD = GpuFacts(cuda_visible_devices="0", tf_package="tensorflow-cpu", tf_version="2.21.0")
CUDA_BUILD = dict(tf_package="tensorflow", tf_cuda_build=True, tf_version="2.21.0")


# ------------------------------------------------------------------ the decision, pure
@pytest.mark.parametrize("facts, setting, action, device, needle", [
    # TensorFlow sees a GPU: go, and name it
    (GpuFacts(device_files=("/dev/nvidia0",), cuda_visible_devices="0", tf_gpus=("NVIDIA H100 80GB HBM3",),
              **CUDA_BUILD), "require", "go", "GPU NVIDIA H100 80GB HBM3", ""),
    (GpuFacts(tf_gpus=("NVIDIA A100", "NVIDIA A100"), **CUDA_BUILD), "prefer", "go", "GPU NVIDIA A100 (x2)", ""),
    # nothing given: a CPU machine is fine unless a GPU is required
    (GpuFacts(tf_package="tensorflow-cpu"), "prefer", "go", "CPU", ""),
    (GpuFacts(cuda_visible_devices="-1", **CUDA_BUILD), "prefer", "go", "CPU", ""),
    (GpuFacts(**CUDA_BUILD), "require", "fail", "CPU", "given no GPU"),
    # given GPUs, CPU-only TensorFlow: the fix is the gpu extra
    (CPU_BUILD, "prefer", "warn", "CPU", "tensorflow-cpu is installed: pip install 'hpcpath[gpu]'"),
    (CPU_BUILD, "require", "fail", "CPU", "tensorflow-cpu is installed: pip install 'hpcpath[gpu]'"),
    (GpuFacts(device_files=("/dev/nvidia0", "/dev/nvidia1"), tf_package="tensorflow"), "require", "fail",
     "CPU", "2 /dev/nvidia* device(s) but TensorFlow sees no GPU: tensorflow (a CPU-only build)"),
    # a CUDA build that sees nothing: no driver on the node, or a driver/library mismatch
    (GpuFacts(cuda_visible_devices="0,1", **CUDA_BUILD), "require", "fail", "CPU", "no /dev/nvidia* device files"),
    (GpuFacts(device_files=("/dev/nvidia0",), cuda_visible_devices="0", **CUDA_BUILD), "require", "fail", "CPU",
     "driver or CUDA library mismatch"),
    # off: CPU on purpose, whatever is there
    (CPU_BUILD, "off", "go", "CPU", ""),
    (GpuFacts(tf_gpus=("NVIDIA A100",), **CUDA_BUILD), "off", "go", "CPU", ""),
])
def test_decide(facts, setting, action, device, needle):
    d = decide(setting, facts)
    assert (d.action, d.device) == (action, device)
    assert needle in d.message
    assert "\n" not in d.message
    if action == "fail":
        assert d.message.startswith("gpu: require")
    if action == "warn":
        assert "running on the CPU" in d.message


def test_settings_from_config_env_and_old_booleans():
    assert TrainConfig(dataset="d.json", out="o").gpu == "prefer"
    assert TrainConfig.load(None, {"dataset": "d.json", "out": "o", "gpu": "require"}).gpu == "require"
    with pytest.raises(ConfigError, match="gpu"):
        TrainConfig.load(None, {"dataset": "d.json", "out": "o", "gpu": "always"})
    assert InferConfig().gpu == "prefer"
    assert (InferConfig(gpu=True).gpu, InferConfig(gpu=False).gpu) == ("require", "off")
    assert InferConfig(xla=True).params_key("m") == InferConfig().params_key("m")  # same outputs
    assert setting_from_env({}) is None and setting_from_env({"HPCPATH_GPU": "OFF"}) == "off"
    with pytest.raises(ConfigError, match="HPCPATH_GPU=maybe: use require, prefer or off"):
        setting_from_env({"HPCPATH_GPU": "maybe"})
    assert visible_ids("0, 1") == ("0", "1") and visible_ids("") == ()
    with pytest.raises(ConfigError):
        decide("sometimes", GpuFacts())


def test_facts_of_this_machine():
    """This machine: the CPU build, no GPU device files (what the fake-GPU tests rely on)."""
    from hpcpath.gpu import gpu_facts

    f = gpu_facts({"CUDA_VISIBLE_DEVICES": "0"})
    assert f.tf_package == "tensorflow-cpu" and not f.tf_cuda_build and f.tf_gpus == ()
    d = decide("require", f)
    assert d.action == "fail" and "CUDA_VISIBLE_DEVICES=0" in d.message


# ------------------------------------------------------------------ through the CLI, on the local Slurm
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Two small synthetic slides through the user's path: synth, tile, dataset build."""
    root = tmp_path_factory.mktemp("gpu")
    cli_dataset(root, 2, "3072x3072", 40)
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"train": {
        "dataset": str(root / "tumor.json"), "out": str(root / "run"), "epochs": 1, "batch_size": 32,
        "steps_per_epoch": 4, "model": {"architecture": "small_cnn", "width": 8}, "gpu": "prefer",
        "mixed_precision": True, "tensorboard": False}}))
    return cfg


def _srun(cfg: Path, *args, **env) -> subprocess.CompletedProcess:
    """``hpcpath train`` as one Slurm task given one of the local Slurm's fake GPUs."""
    return subprocess.run(["srun", "-n1", "--gres=gpu:1", PY, "-m", "hpcpath.cli.main", "train",
                           str(cfg), *args], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})


@pytest.mark.slow
def test_require_fails_in_one_line_on_fake_gpus(tiny, local_slurm):
    """The config says prefer; HPCPATH_GPU=require overrides it: devices given, TF sees none."""
    proc = _srun(tiny, HPCPATH_GPU="require")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcpath")]
    assert lines == ["hpcpath: error: gpu: require: CUDA_VISIBLE_DEVICES=0 but TensorFlow sees no GPU: "
                     "tensorflow-cpu is installed: pip install 'hpcpath[gpu]' (TensorFlow with CUDA) in "
                     "place of the CPU-only 'hpcpath[train]'"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tiny.parent / "run" / "model").exists()


@pytest.mark.slow
def test_prefer_warns_trains_and_records_the_device(tiny, local_slurm):
    """--gpu prefer beats HPCPATH_GPU=require: one warning, a CPU run (mixed precision asked
    for, XLA on: both must run on the CPU), and the device in the run's records."""
    proc = _srun(tiny, "--gpu", "prefer", "--xla", HPCPATH_GPU="require")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "warning: gpu: prefer" in ln]
    assert len(warnings) == 1 and "tensorflow-cpu is installed" in warnings[0], proc.stderr
    run = tiny.parent / "run"
    ranks = json.loads((run / "ranks.json").read_text())
    assert [(r["rank"], r["device"], r["cuda_visible_devices"]) for r in ranks] == [(0, "CPU", "0")]
    meta = json.loads((run / "model" / "hpcpath-model.json").read_text())
    assert meta["extra"]["trained_on"]["devices"] == ["CPU"]
    assert json.loads((run / "config.json").read_text())["xla"] is True
    assert "CPU)" in proc.stderr.splitlines()[-1]  # "hpcpath train: model ... (step 4, ..., CPU)"


def test_bad_env_setting_is_one_line(tmp_path):
    proc = subprocess.run([PY, "-m", "hpcpath.cli.main", "train", str(REPO / "configs" / "train-small-cnn.yaml")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HPCPATH_GPU": "maybe"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "hpcpath: error: HPCPATH_GPU=maybe: use require, prefer or off"


# ------------------------------------------------------------------ inference
def _infer(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "hpcpath.cli.main", "infer", *map(str, args), "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})


@pytest.mark.slow
def test_infer_records_the_device_runs_xla_and_mixed_on_cpu_and_require_fails(tiny, local_slurm):
    """After the training tests: the model over the stores with --xla --mixed-precision (CPU:
    float32, XLA-compiled) equals a plain run; each task's record and the predictions'
    metadata name the device; workers given a GPU TensorFlow cannot see fail one line with
    --gpu require."""
    import csv

    from hpcpath.infer import open_predictions

    root = tiny.parent
    model = root / "run" / "model"
    if not model.exists():
        proc = _srun(tiny, "--gpu", "off")
        assert proc.returncode == 0, proc.stderr[-2000:]
    stores = root / "stores"
    plain = _infer("--model", model, stores, "-o", root / "p1", "--name", "plain", "--gpu", "off")
    assert plain.returncode == 0, plain.stderr[-2000:]
    fast = _infer("--model", model, stores, "-o", root / "p2", "--name", "fast", "--xla", "--mixed-precision")
    assert fast.returncode == 0, fast.stderr[-2000:]
    tasks = list(csv.DictReader(open(root / "p2" / "tasks.csv")))
    assert tasks and {t["device"] for t in tasks} == {"CPU"}
    for st in sorted(stores.glob("*.zarr")):
        a, b = open_predictions(st, "plain"), open_predictions(st, "fast")
        assert {r["device"] for r in b.info["summary"]["task_records"]} == {"CPU"}
        np.testing.assert_allclose(a.heatmap[:], b.heatmap[:], atol=1e-4)
    bad = _infer("--model", model, stores, "-o", root / "p3", "--name", "req", "--gpu", "require",
                 CUDA_VISIBLE_DEVICES="0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("hpcpath: error")]
    assert len(err) == 1 and "gpu: require: CUDA_VISIBLE_DEVICES=0 but TensorFlow sees no GPU" in err[0], bad.stderr


def test_mixed_precision_copy_predicts_like_the_float32_model():
    """The mixed_float16 copy inference uses on GPUs, checked on the CPU (float16 math there
    too): same weights, float16 compute, predictions within float16 rounding."""
    import keras

    from hpcpath.infer.model import with_dtype_policy

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inp))
    x = keras.layers.BatchNormalization()(x)
    out = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    copy = with_dtype_policy(model, "mixed_float16")
    assert copy.layers[2].compute_dtype == "float16" and copy.layers[2].kernel.dtype == "float32"
    xs = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(copy(xs), np.float32), np.asarray(model(xs)), atol=2e-3)


def test_doctests():
    import doctest

    import hpcpath.gpu
    import hpcpath.train.tfdist

    for mod in (hpcpath.gpu, hpcpath.train.tfdist):
        res = doctest.testmod(mod)
        assert res.attempted > 0 and res.failed == 0, mod.__name__

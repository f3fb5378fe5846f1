"""The Spark backend with real parts: ``local[2]`` and a real standalone cluster
(``bin/local-spark``: a master and two workers with two fake GPUs each), against the Dask
backend on the same inputs.

Acceptance: every file of every store from ``hpcpath tile --cluster spark...`` is
byte-identical to the Dask backend's (chunks and metadata); dataset build and inference
outputs are equal too; bad slides get the same manifest records, messages and exit code;
Python workers killed by pid mid-stage are retried by Spark with identical outputs; each
prediction task on the standalone cluster saw exactly one GPU address and no two concurrent
tasks the same one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import tiny_model

from hpcpath.backends import Unit, as_backend, phases
from hpcpath.backends.inline import InlineBackend
from hpcpath.errors import ConfigError

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
NAME = "mitosis"


def run_cli(*args, timeout=600):
    proc = subprocess.run([*HPCPATH, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    return proc


def tree_digest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not any(s in p.parts for s in skip)}


def store_digests(out: Path) -> dict[str, dict[str, str]]:
    return {p.name: tree_digest(p) for p in sorted(out.glob("*.zarr"))}


def records(out: Path) -> list[dict]:
    doc = json.loads((out / "hpcpath-manifest.json").read_text())
    slides = doc["slides"] if isinstance(doc["slides"], list) else list(doc["slides"].values())
    return sorted(({k: v for k, v in r.items() if k not in ("seconds", "finished")} for r in slides),
                  key=lambda r: r["slide_id"])


def messages(proc, out: Path) -> list[str]:
    """hpcpath's own lines, without the ones that name the engine (dashboard, Spark UI),
    sorted: slides finish in any order on either engine."""
    engine = ("dashboard", "Dask", "Spark", "ssh -L", "hpcpath page", "/hpcpath")
    return sorted(ln.replace(str(out), "OUT") for ln in proc.stderr.splitlines()  # in any order
                  if ln.startswith("hpcpath:") and not any(e in ln for e in engine))


# ----------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("text, master", [("spark", "local[*]"), ("local[2]", "local[2]"),
                                          ("spark://10.0.0.5:7077", "spark://10.0.0.5:7077"),
                                          ("yarn", "yarn")])
def test_cluster_strings_name_spark_masters(text, master):
    from hpcpath.cluster import parse_cluster_spec

    spec = parse_cluster_spec(text)
    assert spec.backend == "spark" and spec.master == master
    assert parse_cluster_spec("tcp://10.0.0.5:8786").backend == "scheduler"  # Dask stays Dask


def test_spark_yaml_mistakes_are_one_line(tmp_path):
    from hpcpath.cluster import parse_cluster_spec

    cases = {"master: spork://x": "cluster.master: 'spork://x' is not a Spark master",
             "executor_gpus: 2": "executor_gpus needs gpu_discovery_script",
             "executor_memory: lots": "'lots' is not a JVM size",
             "conf: {foo.bar: 1}": "'foo.bar' is not a Spark setting",
             "exector_cores: 2": "exector_cores"}
    for body, text in cases.items():
        f = tmp_path / "c.yaml"
        f.write_text(f"cluster:\n  backend: spark\n  {body}\n")
        with pytest.raises(ConfigError) as err:
            parse_cluster_spec(f)
        msg = str(err.value)
        assert text in msg and "\n" not in msg and msg.startswith(str(f)), msg


def test_spark_conf_gpus_retries_and_local_slots():
    from hpcpath.backends.spark import spark_conf
    from hpcpath.cluster.spec import SparkSpec

    master, conf = spark_conf(SparkSpec(backend="spark"), n_workers=3)
    assert master == "local[3,4]" and conf["spark.task.maxFailures"] == "4"
    assert conf["spark.pyspark.python"] == sys.executable
    spec = SparkSpec(backend="spark", master="spark://h:1", executor_cores=2, executor_gpus=2,
                     gpu_discovery_script="/bin/true", conf={"spark.speculation": True})
    master, conf = spark_conf(spec)
    assert master == "spark://h:1" and conf["spark.executor.cores"] == "2"
    assert conf["spark.executor.resource.gpu.amount"] == "2" and conf["spark.task.resource.gpu.amount"] == "1"
    assert conf["spark.executor.resource.gpu.discoveryScript"] == "/bin/true"
    assert conf["spark.speculation"] == "True"


def test_stage_modules_import_no_engine():
    code = ("import sys, hpcpath.tiling, hpcpath.dataset.build, hpcpath.infer.run, hpcpath.stage; "
            "print([m for m in ('distributed', 'dask', 'pyspark') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _count(n, *deps):
    if n < 0:
        raise ValueError("negative")
    return n + sum(deps)


def test_inline_backend_runs_units_in_order_and_isolates_failures():
    plans = {"a": (dict, ()), "b": (dict, ()), "c": (_count, (-1,))}
    seen = {}

    def expand(sid, plan):
        units = [Unit(_count, (1,), "x", ("x", 0)), Unit(_count, (2,), "x", ("x", 1)),
                 Unit(_count, (10,), "y", ("y",), after=(0, 1))]
        if sid == "b":
            units.insert(0, Unit(_count, (-5,), "x", ("bad",)))
        return units

    def finish(sid, out):
        seen[sid] = (out.sums, out.error)

    InlineBackend().run(plans, expand, finish, stage="t")
    assert seen["a"] == ({"x": 3, "y": 13}, None)  # y got both results appended
    assert seen["b"][1] == "ValueError: negative"
    assert seen["c"] == ({}, "ValueError: negative")  # a raising plan fails its slide
    assert phases(expand("a", {})) == [0, 0, 1]
    assert isinstance(as_backend("inline"), InlineBackend)


def test_a_spark_slide_task_runs_its_chain_in_order_and_stops_at_a_failure():
    """What one Spark task does with a whole slide (run on its own: it is a plain function)."""
    pytest.importorskip("pyspark")
    from hpcpath.backends.spark import _execute_slides

    chain = [(_count, (1,), (), 0, False), (_count, (2,), (), 0, False), (_count, (10,), (0, 1), 0, False),
             (_count, (-1,), (), 0, False), (_count, (5,), (3,), 0, False), (_count, (7,), (2,), 0, False)]
    [recs] = list(_execute_slides([(chain, None)]))
    bad = ("error", "ValueError: negative")
    assert recs == [("ok", 1), ("ok", 2), ("ok", 13), bad, bad, ("ok", 20)]


def test_without_pyspark_the_error_is_one_line(monkeypatch):
    import builtins

    from hpcpath.backends.spark import spark_backend
    from hpcpath.cluster.spec import SparkSpec

    real = builtins.__import__

    def no_pyspark(name, *a, **kw):
        if name.startswith("pyspark"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_pyspark)
    with pytest.raises(ConfigError, match="pyspark is not installed; pip install 'hpcpath\\[spark\\]'"):
        with spark_backend(SparkSpec(backend="spark")):
            pass


# ----------------------------------------------------------------------------- real Spark
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, test_data):
    """Three small synthetic slides, the real bad slides, and a tiny untrained points model
    (its outputs only need to be reproducible)."""
    pytest.importorskip("pyspark")
    root = tmp_path_factory.mktemp("spark")
    proc = run_cli("synth", "-o", root / "slides", "-n", 3, "--size", "4096x4096", "--seed", 11)
    assert proc.returncode == 0, proc.stderr
    tiny_model(root / "model", 64, 4, ("Mitosis",), task="points")
    bad = sorted(str(p) for p in (test_data / "bad").iterdir())
    return {"root": root, "slides": root / "slides", "bad": bad, "model": root / "model"}


@pytest.fixture(scope="module")
def dask_ref(inputs):
    """The Dask backend's outputs: tile (with the bad slides), dataset build, infer."""
    root = inputs["root"] / "dask"
    tile = run_cli("tile", inputs["slides"], *inputs["bad"], "-o", root / "stores", "--workers", 2)
    tiled = store_digests(root / "stores")
    build = run_cli("dataset", "build", root / "stores", "-a", inputs["slides"], "-o", root / "ds.json",
                    "--context", 4, "--workers", 2)
    assert build.returncode == 0, build.stderr
    built = store_digests(root / "stores")
    return {"root": root, "tile": tile, "tiled": tiled, "built": built}


@pytest.fixture(scope="module")
def dask_pred(inputs, dask_ref):
    """The Dask backend's inference over its stores."""
    root = dask_ref["root"]
    infer = run_cli("infer", "--model", inputs["model"], root / "stores", "-o", root / "pred",
                    "--name", NAME, "--stride", 32, "--windows-per-task", 600, "--workers", 2)
    assert infer.returncode == 0, infer.stderr
    return root / "pred"


def _same_predictions(a: Path, b: Path, stores_a: Path, stores_b: Path) -> None:
    from hpcpath.infer import open_predictions

    ids = sorted(p.stem for p in stores_a.glob("*.zarr"))
    assert ids and ids == sorted(p.stem for p in stores_b.glob("*.zarr"))
    for sid in ids:
        pa, pb = (open_predictions(s / f"{sid}.zarr", NAME) for s in (stores_a, stores_b))
        np.testing.assert_array_equal(pa.heatmap[:], pb.heatmap[:])
        np.testing.assert_array_equal(pa.detections, pb.detections)
        for f in (f"{sid}.overlay.png", f"{sid}.detections.csv", f"{sid}.detections.geojson"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    cols = ("slide_id", "status", "windows", "tasks", "max_prob", "detections")
    rows = [[{c: r[c] for c in cols} for r in csv.DictReader(open(d / "summary.csv"))] for d in (a, b)]
    assert rows[0] == rows[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local2_tiles_equal_dask_with_the_same_bad_slide_lines(inputs, dask_ref, tmp_path):
    out = tmp_path / "stores"
    proc = run_cli("tile", inputs["slides"], *inputs["bad"], "-o", out, "--cluster", "local[2]")
    ref = dask_ref["root"] / "stores"
    assert proc.returncode == dask_ref["tile"].returncode == 1  # the bad slides failed
    assert records(out) == records(ref)
    assert sum(r["status"] == "failed" for r in records(out)) == len(inputs["bad"])
    assert messages(proc, out) == messages(dask_ref["tile"], ref)
    assert "Spark local[2,4]" in proc.stderr
    digests = store_digests(out)
    assert len(digests) == 3 and digests == dask_ref["tiled"]


def _python_workers(spark_dir: str) -> list[psutil.Process]:
    """The standalone cluster's forked Python workers: children of a ``pyspark.daemon`` that
    an executor of ``bin/local-spark`` (working in ``spark_dir``) started; nobody else's."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "pyspark.daemon" not in " ".join(p.info["cmdline"] or []):
                continue
            parent = p.parent()
            if (parent is None or "CoarseGrainedExecutorBackend" not in " ".join(parent.cmdline())
                    or not parent.cwd().startswith(spark_dir)):
                continue
            found += [c for c in p.children() if "pyspark.daemon" in " ".join(c.cmdline())]
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_standalone_stages_equal_dask_and_survive_killed_python_workers(local_spark, inputs, dask_ref, tmp_path):
    ref = dask_ref["root"]
    out = tmp_path / "stores"
    killed: list[int] = []
    ended = threading.Event()

    def kill_mid_stage():  # every Python worker, by pid, once the first tile chunk is written
        while not ended.is_set():
            if any(out.glob("*.zarr/tiles/images/c.*")):
                for w in _python_workers(local_spark["dir"]):
                    try:
                        w.kill()
                        killed.append(w.pid)
                    except psutil.NoSuchProcess:
                        pass
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_mid_stage, daemon=True)
    killer.start()
    proc = run_cli("tile", inputs["slides"], "-o", out, "--cluster", local_spark["master"],
                   "--tiles-per-task", 8, "--chunk-tiles", 8)
    ended.set()
    killer.join()
    assert proc.returncode == 0, proc.stderr
    assert killed, "no Python worker was found to kill"
    log = (out / "hpcpath-logs" / "spark-driver.log").read_text()
    assert "Lost task" in log  # Spark saw the killed tasks and retried them
    # the same stores as Dask's with the default chunking: compare pixels, tile by tile
    import zarr

    for st in sorted(out.glob("*.zarr")):
        a, b = zarr.open_group(st, mode="r"), zarr.open_group(ref / "stores" / st.name, mode="r")
        for arr in ("tiles/images", "tiles/index", "tissue/mask", "image/0", "image/1"):
            np.testing.assert_array_equal(a[arr][:], b[arr][:])
    # then the default chunking, dataset build and inference: byte-identical to Dask
    out = tmp_path / "b" / "stores"  # the same name as Dask's: the dataset manifest names it
    proc = run_cli("tile", inputs["slides"], "-o", out, "--cluster", local_spark["master"])
    assert proc.returncode == 0, proc.stderr
    assert store_digests(out) == dask_ref["tiled"]
    proc = run_cli("dataset", "build", out, "-a", inputs["slides"], "-o", tmp_path / "b" / "ds.json",
                   "--context", 4, "--cluster", local_spark["master"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b" / "ds.json").read_text() == (ref / "ds.json").read_text()
    assert store_digests(out) == dask_ref["built"]  # the dataset groups too


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_standalone_inference_one_fake_gpu_per_task_equals_dask(local_spark, inputs, dask_ref, dask_pred, tmp_path):
    import shutil

    ref = dask_ref["root"]
    out = tmp_path / "stores"
    shutil.copytree(ref / "stores", out, ignore=shutil.ignore_patterns("predictions", "hpcpath-logs"))
    spec = tmp_path / "spark.yaml"
    spec.write_text(f"cluster:\n  backend: spark\n  master: {local_spark['master']}\n"
                    "  executor_cores: 2\n  executor_gpus: 2\n"
                    f"  gpu_discovery_script: {local_spark['gpu_script']}\n")
    proc = run_cli("infer", "--model", inputs["model"], out, "-o", tmp_path / "pred", "--name", NAME,
                   "--stride", 32, "--windows-per-task", 600, "--cluster", spec)
    assert proc.returncode == 0, proc.stderr
    _same_predictions(tmp_path / "pred", dask_pred, out, ref / "stores")

    # GPU scheduling: one address per prediction task, never two concurrent tasks on one
    from hpcpath.infer import open_predictions

    tasks = [t for st in sorted(out.glob("*.zarr"))
             for t in open_predictions(st, NAME).info["summary"]["task_records"]]
    assert len(tasks) >= 6
    assert all(t["gpu_address"] in ("0", "1", "2", "3") for t in tasks), [t["gpu_address"] for t in tasks]
    assert len({t["gpu_address"] for t in tasks}) >= 2
    for i, a in enumerate(tasks):
        for b in tasks[i + 1:]:
            if a["gpu_address"] == b["gpu_address"]:
                assert a["ended"] <= b["started"] or b["ended"] <= a["started"], (a, b)


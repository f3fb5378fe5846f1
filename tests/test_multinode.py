"""Dask across the nodes of a real two-node Slurm (``local_slurm2``: n1 and n2, each a slurmd
with its own hostname, network address and node-local /tmp).  What one node cannot catch:
anything passed between nodes through a node-local path, an address other nodes must dial,
work that silently stays on one node, a node lost mid-run.  Every run is compared byte for
byte with a LocalCluster run of the same stage."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import tiny_model

from hpcpath.cluster import cluster_client
from hpcpath.cluster.allocation import _worker_facts
from hpcpath.config import InferConfig, TileConfig
from hpcpath.infer import infer_slides
from hpcpath.synth import make_cohort
from hpcpath.tiling import tile_slides

slow = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "bin" / "local-slurm"
TILE = TileConfig(chunk_tiles=16, tiles_per_task=16)       # several tile tasks per slide
INFER = InferConfig(name="tumor", windows_per_task=8)      # several predict tasks per slide


def _env(cluster: dict[str, str], **extra: str) -> dict[str, str]:
    return {**os.environ, **cluster, "HPCPATH_PYTHON": sys.executable, **extra}


def _run(env: dict[str, str], *cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Where and how long a task ran: the only attributes a cluster run may change.
PROVENANCE = {"cuda_visible_devices", "tf_gpus", "device", "devices", "worker", "host",
              "slurm_job_id", "seconds", "predict_s", "io_wait_s", "io_wait_fraction",
              "gpu_address", "pid", "started", "ended"}


def _strip(doc):
    if isinstance(doc, dict):
        return {k: _strip(v) for k, v in doc.items() if k not in PROVENANCE}
    if isinstance(doc, list):
        return [_strip(v) for v in doc]
    return doc


def _assert_same_files(a: Path, b: Path, provenance: bool = False) -> None:
    """Every file byte for byte; with ``provenance``, JSON attribute files less PROVENANCE."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert fa, f"no files under {a}"
    differ = [name for name in fa if fa[name] != fb[name]]
    if provenance:
        differ = [n for n in differ if not n.endswith(".json")
                  or _strip(json.loads(fa[n])) != _strip(json.loads(fb[n]))]
    assert not differ, f"differ from the LocalCluster run: {differ[:10]}"


def _same_stores(a: Path, b: Path) -> None:
    """Every chunk and attribute file of every store."""
    stores = sorted(p.name for p in a.glob("*.zarr"))
    assert stores and stores == sorted(p.name for p in b.glob("*.zarr"))
    for s in stores:
        _assert_same_files(a / s, b / s)


def _sbatch(env: dict[str, str], args: list[str], cwd: Path, timeout: float = 420,
            on_running=None) -> tuple[str, str, str]:
    """Submit; poll scontrol twice a second until the job ends; (state, exit code, log)."""
    out = _run(env, "sbatch", "--parsable", f"--output={cwd}/job.log", *args, cwd=cwd)
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            info = subprocess.run(["scontrol", "show", "job", "-o", job], env=env,
                                  capture_output=True, text=True, timeout=30).stdout
            fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
            state = fields.get("JobState")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None):
                log = (cwd / "job.log").read_text() if (cwd / "job.log").exists() else ""
                return state, fields.get("ExitCode", ""), log
            if state == "RUNNING" and on_running is not None:
                on_running = on_running(job)
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"Slurm job {job} did not end within {timeout} s")


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def shared_dir():
    """One folder for the module's slides, stores and model, on a path every node sees."""
    root = Path("/var/tmp/hpcpath-tests")
    root.mkdir(mode=0o1777, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="multinode-", dir=root))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def slides(shared_dir):
    make_cohort(shared_dir / "slides", n=2, width=3072, height=3072, seed=900)
    return shared_dir / "slides"


@pytest.fixture(scope="module")
def local_stores(slides, shared_dir, dask_client):
    out = shared_dir / "local-stores"
    assert tile_slides([slides], out, TILE, client=dask_client).ok
    return out


@pytest.fixture(scope="module")
def model(shared_dir):
    """A tiny untrained CNN with the model contract: its outputs only need to be reproducible."""
    return tiny_model(shared_dir / "model", 256, 8, ("Tumor",))


@pytest.fixture(scope="module")
def local_infer(local_stores, model, shared_dir, dask_client):
    stores = shutil.copytree(local_stores, shared_dir / "infer-local-stores")
    out = shared_dir / "infer-local"
    res = infer_slides([stores], model, out, INFER, client=dask_client)
    assert res.ok, res.failed
    return stores, out


def _same_predictions(stores_a: Path, out_a: Path, stores_b: Path, out_b: Path) -> None:
    """Prediction arrays (every chunk byte for byte, every attribute file less where tasks
    ran) and overlays."""
    sids = sorted(p.stem for p in stores_b.glob("*.zarr"))
    for sid in sids:
        _assert_same_files(stores_a / f"{sid}.zarr" / "predictions" / INFER.name,
                           stores_b / f"{sid}.zarr" / "predictions" / INFER.name, provenance=True)
        assert (out_a / f"{sid}.overlay.png").read_bytes() == (out_b / f"{sid}.overlay.png").read_bytes()


# ----------------------------------------------------------------------------- the cluster
@slow
def test_nodes_have_own_hostname_address_and_tmp(local_slurm2, shared_tmp):
    out = _run(
        _env(local_slurm2),
        "srun", "-N2", "-n2", "--gres=gpu:1", "bash", "-c",
        'echo "$(hostname) $(hostname -I) $CUDA_VISIBLE_DEVICES $(getent hosts n1 n2 | wc -l)";'
        ' echo x > /tmp/mark-$SLURM_JOB_ID-$(hostname);'
        f' ls /tmp | grep -c mark-$SLURM_JOB_ID; touch {shared_tmp}/$(hostname);'
        ' rm /tmp/mark-$SLURM_JOB_ID-$(hostname)',
        cwd=shared_tmp,
    )
    lines = [line for line in out.split("\n") if line.strip()]
    rows = sorted(line.split() for line in lines if " " in line)
    assert rows == [["n1", "10.77.0.11", "0", "2"], ["n2", "10.77.0.12", "0", "2"]]
    assert [line for line in lines if " " not in line] == ["1", "1"]  # /tmp is per node
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["n1", "n2"]


# ----------------------------------------------------------------------------- sbatch scripts
def _work_per_host(job_dir: Path) -> dict[str, int]:
    per_host: dict[str, int] = {}
    for w in json.loads((job_dir / "workers.json").read_text()):
        per_host[w["host"]] = per_host.get(w["host"], 0) + w["tasks"]
    return per_host


@slow
def test_tile_sbatch_on_two_nodes_equals_local(local_slurm2, slides, local_stores, shared_tmp):
    state, code, log = _sbatch(
        _env(local_slurm2),
        ["--nodes=2", "--ntasks-per-node=1", "--mem-per-cpu=1G", str(REPO / "slurm" / "tile.sbatch"),
         str(slides), "-o", str(shared_tmp / "out"), "--chunk-tiles", "16", "--tiles-per-task", "16"],
        cwd=shared_tmp)
    assert (state, code) == ("COMPLETED", "0:0"), log
    assert "2 tiled" in log and "scheduler on 10.77.0.11" in log, log
    # the dashboard on the batch node n1, and the tunnel a user on a laptop needs to reach it
    login = socket.gethostname().split(".")[0]
    assert "dashboard http://10.77.0.11:8787/status" in log, log
    assert f"dashboard from your machine: ssh -N -L 8787:n1:8787 {login}" in log, log
    (job_dir,) = (shared_tmp / ".hpcpath").iterdir()
    work = _work_per_host(job_dir)
    assert sorted(work) == ["n1", "n2"] and all(work.values()), work  # both nodes did tasks
    assert not (job_dir / "scheduler.json").exists()  # removed at the end
    job = job_dir.name.split("-")[1]
    scratch = f"Local Directory: /tmp/hpcpath-{job}/"  # node-local worker scratch ...
    assert (job_dir / "workers.log").read_text().count(scratch) == 2
    nodes = Path(local_slurm2["HPCPATH_SLURM2_DIR"])  # ... removed when the workers end
    assert not list(nodes.glob(f"tmp-n*/hpcpath-{job}")), list(nodes.glob("tmp-n*/*"))
    _same_stores(shared_tmp / "out", local_stores)


@slow
def test_infer_sbatch_on_two_nodes_equals_local(local_slurm2, local_stores, model, local_infer, shared_tmp):
    stores = shutil.copytree(local_stores, shared_tmp / "stores")
    state, code, log = _sbatch(
        _env(local_slurm2),
        ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1",
         "--mem-per-cpu=2G", str(REPO / "slurm" / "infer.sbatch"), "--model", str(model),
         str(stores), "-o", str(shared_tmp / "out"), "--name", INFER.name,
         "--windows-per-task", str(INFER.windows_per_task)],
        cwd=shared_tmp)
    assert (state, code) == ("COMPLETED", "0:0"), log
    assert "2 predicted" in log, log
    tasks = list(csv.DictReader(open(shared_tmp / "out" / "tasks.csv")))
    assert {t["host"] for t in tasks} == {"n1", "n2"}  # prediction tasks ran on both nodes
    assert {t["cuda_visible_devices"] for t in tasks} == {"0"}  # each worker its node's GPU
    _same_predictions(stores, shared_tmp / "out", *local_infer)


@slow
def test_workers_that_never_come_fail_the_job_with_one_line(local_slurm2, slides, shared_tmp):
    """A job folder on a node-local path: n2's worker cannot read the scheduler file."""
    env = _env(local_slurm2, HPCPATH_JOB_DIR=f"/tmp/hpcpath-job-{shared_tmp.name}",
               HPCPATH_WORKER_TIMEOUT="10")
    state, code, log = _sbatch(
        env, ["--nodes=2", "--ntasks-per-node=1", "--mem-per-cpu=1G",
              str(REPO / "slurm" / "tile.sbatch"), str(slides), "-o", str(shared_tmp / "out")],
        cwd=shared_tmp)
    assert state == "FAILED", log
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and "1 of 2 Dask workers connected (n1-0)" in errors[0], log
    assert "Traceback" not in log and not (shared_tmp / "out").exists()
    shutil.rmtree(Path(local_slurm2["HPCPATH_SLURM2_DIR"], "tmp-n1", f"hpcpath-job-{shared_tmp.name}"))


# ----------------------------------------------------------------------------- dask-jobqueue
@slow
def test_jobqueue_workers_on_both_nodes(local_slurm2, slides, local_stores, shared_tmp, monkeypatch):
    """`--cluster slurm`: the scheduler here (the login node), one worker job per node."""
    for key, value in local_slurm2.items():
        monkeypatch.setenv(key, value)
    spec = {
        "backend": "slurm", "jobs": 2, "cores": 1, "memory": "1GB", "walltime": "00:10:00",
        "python": sys.executable, "log_directory": str(shared_tmp / "logs"),
        "local_directory": "/tmp", "job_extra_directives": ["--exclusive"],  # node-local
        "worker_timeout": 300,  # --exclusive jobs wait for whole nodes
    }
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=300)
        hosts = client.run(socket.gethostname)
        assert sorted(hosts.values()) == ["n1", "n2"]
        res = tile_slides([slides], shared_tmp / "out", TILE, client=client)
        facts = client.run(_worker_facts)
    assert res.ok
    assert all(f["tasks"] > 0 for f in facts.values()), facts
    _same_stores(shared_tmp / "out", local_stores)


# ----------------------------------------------------------------------------- a lost node
@slow
def test_node_lost_mid_inference_other_node_finishes(local_slurm2, local_stores, model, local_infer, shared_tmp):
    """n2 crashes (down, every process on it killed) while it predicts: n1 redoes its tasks."""
    from distributed import Client

    env = _env(local_slurm2, HPCPATH_JOB_DIR=str(shared_tmp / "job"))
    stores = shutil.copytree(local_stores, shared_tmp / "stores")
    lost: list[str] = []

    def watch(job: str):
        """Once a predict task runs on n2, take n2 down; None when done (stop calling)."""
        sched = shared_tmp / "job" / "scheduler.json"
        if not sched.exists():
            return watch
        try:
            with Client(scheduler_file=str(sched), timeout=10) as client:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    info = client.scheduler_info(n_workers=-1)["workers"]
                    names = {a: w["name"] for a, w in info.items()}
                    for addr, keys in client.processing().items():
                        busy = [str(k) for k in keys if re.match(r"predict-slide_\d+/\d+/", str(k))]
                        if busy and str(names.get(addr, "")).startswith("n2-"):
                            _run(env, str(BIN), "fail", "--nodes", "2", "n2")
                            lost.append(busy[0])
                            return None
                    time.sleep(0.05)
        except OSError:
            return watch
        return None

    try:
        state, code, log = _sbatch(
            env,
            ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1",
             "--mem-per-cpu=2G", str(REPO / "slurm" / "infer.sbatch"), "--model", str(model),
             str(stores), "-o", str(shared_tmp / "out"), "--name", INFER.name,
             "--windows-per-task", str(INFER.windows_per_task)],
            cwd=shared_tmp, on_running=watch)
    finally:
        _run(env, str(BIN), "resume", "--nodes", "2", "n2")
    assert lost, "no prediction task was seen running on n2"
    assert (state, code) == ("COMPLETED", "0:0"), log
    tasks = list(csv.DictReader(open(shared_tmp / "out" / "tasks.csv")))
    sid, k = lost[0].split("-", 1)[1].split("/")[:2]
    assert [t["host"] for t in tasks if t["slide_id"] == sid and t["task"] == k] == ["n1"]
    assert "tasks per node: n1" in log and "n2" not in log.split("tasks per node:")[1]
    _same_predictions(stores, shared_tmp / "out", *local_infer)


# ----------------------------------------------------------------------------- pure parts
def test_allocation_doctests():
    import doctest

    import hpcpath.cluster.allocation as allocation
    import hpcpath.netaddr as netaddr

    runs = [doctest.testmod(allocation), doctest.testmod(netaddr)]  # the address rules moved there
    assert sum(r.attempted for r in runs) >= 8 and not any(r.failed for r in runs)


def test_contact_address_rules():
    from hpcpath.errors import ClusterError
    from hpcpath.netaddr import choose_address

    ifaces = {"lo": ["127.0.0.1"], "eth0": ["10.77.0.11"], "ib0": []}
    assert choose_address("eth0", ifaces, "127.0.0.1") == "10.77.0.11"  # interface wins
    assert choose_address(None, ifaces, "127.0.0.1", multi_node=False) == "127.0.0.1"
    assert choose_address(None, ifaces, "n1", ["10.77.0.11"]) == "10.77.0.11"
    for args, kw, words in [
        (("ib0", ifaces), {}, "has no IPv4 address"),
        ((None, ifaces, "127.0.0.1"), {}, "loopback"),
        ((None, ifaces, "cn9", []), {}, "does not resolve"),
        ((None, ifaces), {}, "set HPCPATH_INTERFACE"),
    ]:
        with pytest.raises(ClusterError, match=words) as err:
            choose_address(*args, **kw)
        assert "\n" not in str(err.value)


def test_bad_interface_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "hpcpath.cluster.allocation", "address"],
                          env={**os.environ, "HPCPATH_INTERFACE": "ib9"}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith("hpcpath: error: HPCPATH_INTERFACE=ib9: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- documentation
_EXAMPLE_PATH = re.compile(r"(?<![\w/.-])((?:configs|slurm)/[\w.-]+\.(?:ya?ml|sbatch))\b")


def test_every_example_names_files_that_exist():
    """configs/... and slurm/... named in sbatch comments, the README and docs/ exist."""
    sources = [*sorted((REPO / "slurm").glob("*.sbatch")), REPO / "README.md",
               *sorted((REPO / "docs").glob("*.md"))]
    missing = []
    for src in sources:
        text = src.read_text()
        if src.suffix == ".sbatch":
            text = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        for name in sorted(set(_EXAMPLE_PATH.findall(text))):
            if not (REPO / name).exists():
                missing.append(f"{src.relative_to(REPO)}: {name}")
    assert not missing, missing

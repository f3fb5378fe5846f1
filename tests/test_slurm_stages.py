"""Tiling and dataset builds on a real Slurm: Dask workers as Slurm jobs (dask-jobqueue), and
the sbatch script whose allocation hosts scheduler and workers.  Outputs must equal a
LocalCluster run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcpath.cluster import cluster_client
from hpcpath.config import TileConfig
from hpcpath.store import open_store
from hpcpath.tiling import tile_slides

REPO = Path(__file__).resolve().parents[1]
SLIDES = ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs")


def _assert_same_stores(a: Path, b: Path, sid: str) -> None:
    sa, sb = open_store(a / f"{sid}.zarr"), open_store(b / f"{sid}.zarr")
    assert sa.meta == sb.meta
    np.testing.assert_array_equal(sa.index, sb.index)
    np.testing.assert_array_equal(sa.tiles[:], sb.tiles[:])
    np.testing.assert_array_equal(sa.pyramid[0][:], sb.pyramid[0][:])


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, test_data, dask_client):
    out = tmp_path_factory.mktemp("local")
    res = tile_slides([test_data / "slides" / s for s in SLIDES], out, TileConfig(), client=dask_client)
    assert res.ok
    return out


def test_tile_with_dask_jobqueue_workers_on_slurm(local_slurm, test_data, local_reference, tmp_path):
    spec = {
        "backend": "slurm", "jobs": 2, "cores": 1, "memory": "2GB", "walltime": "00:10:00",
        "python": sys.executable, "log_directory": str(tmp_path / "logs"), "worker_timeout": 120,
    }
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=120)
        hosts = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
        assert len(set(hosts.values())) == 2 and all(hosts.values())  # two real Slurm jobs
        res = tile_slides([test_data / "slides" / s for s in SLIDES], tmp_path / "out", TileConfig(), client=client)
    assert res.ok
    for s in SLIDES:
        _assert_same_stores(tmp_path / "out", local_reference, Path(s).stem)


def test_sbatch_tile_script_runs_scheduler_and_workers_in_the_allocation(local_slurm, test_data, local_reference, tmp_path):
    env = {**os.environ, "HPCPATH_PYTHON": sys.executable, "HPCPATH_DASHBOARD": "127.0.0.1:0"}
    proc = subprocess.run(
        ["sbatch", "--wait", "--ntasks=2", "--mem-per-cpu=1G", f"--output={tmp_path}/job.log",
         str(REPO / "slurm" / "tile.sbatch"), *[str(test_data / "slides" / s) for s in SLIDES],
         "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    log = (tmp_path / "job.log").read_text() if (tmp_path / "job.log").exists() else ""
    assert proc.returncode == 0, proc.stderr + log
    assert "2 tiled" in log
    # the dashboard runs on the batch node: the log says how to reach it from a laptop
    port = re.search(r"dashboard http://127\.0\.0\.1:(\d+)/status", log).group(1)
    node = socket.gethostname().split(".")[0]
    assert f"dashboard from your machine: ssh -N -L 8787:127.0.0.1:{port} {node}" in log, log
    for s in SLIDES:
        _assert_same_stores(tmp_path / "out", local_reference, Path(s).stem)
    # each worker process started with one malloc arena (hpcpath._malloc.WORKER_ENV)
    (report,) = (tmp_path / ".hpcpath").glob("slurm-*/workers.json")
    rows = json.loads(report.read_text())
    assert len(rows) == 2 and {r["malloc_arenas"] for r in rows} == {1}, rows


def test_dataset_build_on_slurm_workers_equals_local(local_slurm, dask_client, tmp_path):
    """`hpcpath dataset build --cluster <slurm>`: labels and context patches are made on Slurm
    job workers (context patches read from the slide there) and equal a LocalCluster build."""
    import yaml
    import zarr

    from hpcpath.config import DatasetConfig
    from hpcpath.dataset import build_dataset, open_dataset
    from hpcpath.synth import make_cohort

    make_cohort(tmp_path / "slides", n=2, width=2048, height=2048, seed=77)
    assert tile_slides([tmp_path / "slides"], tmp_path / "stores", TileConfig(), client=dask_client).ok
    anns = sorted(str(p) for p in (tmp_path / "slides").glob("*.tumor.xml"))
    local = build_dataset([tmp_path / "stores"], anns, tmp_path / "local.json",
                          DatasetConfig(name="local", context_downsamples=(4.0,)), client=dask_client)
    assert local.ok
    spec = tmp_path / "slurm.yaml"
    spec.write_text(yaml.safe_dump({
        "backend": "slurm", "jobs": 2, "cores": 1, "memory": "2GB", "walltime": "00:10:00",
        "python": sys.executable, "log_directory": str(tmp_path / "logs"), "worker_timeout": 120}))
    proc = subprocess.run(
        [sys.executable, "-m", "hpcpath.cli.main", "dataset", "build", str(tmp_path / "stores"),
         *sum((["-a", a] for a in anns), []), "-o", str(tmp_path / "slurm.json"), "--name", "slurm",
         "--context", "4", "--cluster", str(spec)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = open_dataset(tmp_path / "local.json"), open_dataset(tmp_path / "slurm.json")
    assert 0 < a.labels.sum() < len(a)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.item, b.item)
    for store in a.stores:
        g = zarr.open_group(str(store), mode="r")["datasets"]
        ctx_a, ctx_b = g["local/context"], g["slurm/context"]
        assert sorted(ctx_a.array_keys()) == sorted(ctx_b.array_keys()) != []
        for k in ctx_a.array_keys():
            np.testing.assert_array_equal(ctx_a[k][:], ctx_b[k][:])

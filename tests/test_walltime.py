"""A Slurm worker job that reaches its walltime mid-run (issue #14), on the real local Slurm.

One worker job at a time with ``walltime: "00:01:00"`` (Slurm's shortest) and nothing else
about lifetimes in the spec: hpcpath derives ``--lifetime``/``--lifetime-stagger`` from the
walltime, so the worker retires gracefully before Slurm would kill it, its job ends, and the
fixed job count is kept by submitting a replacement job, which finishes the run.  The tiling
is sized (from a timed one-slide run on this machine) to outlast the first job.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hpcpath.store import is_complete

pytestmark = pytest.mark.slow

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
# 128-px tiles every 32 px: much reading per slide for a small synthetic slide and small stores
OPTS = ["--tile-size", "128", "--overlap", "96", "--codec", "jpeg", "--jpeg-quality", "5",
        "--chunk-tiles", "64", "--tiles-per-task", "128", "--no-pyramid"]
WORK_S = 60  # seconds of tiling the Slurm run is given; the first job's worker retires at 37 +/- 3 s


def _tile(slides: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*HPCPATH, "tile", str(slides), "-o", str(out), *OPTS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _squeue(name: str) -> dict[str, str]:
    out = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%i %T"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("walltime-slide")
    subprocess.run([*HPCPATH, "synth", "-o", str(d), "-n", "1", "--size", "4096x4096", "--mitoses", "0"],
                   check=True, capture_output=True, timeout=300)
    return d / "slide_000.svs"


def test_worker_job_at_its_walltime_retires_and_is_replaced(local_slurm, slide, tmp_path):
    # How long a slide takes one worker here and now (a LocalCluster run of the first 3, the
    # start of the reference), so that the Slurm run gets about WORK_S of work.
    slides = tmp_path / "slides"
    slides.mkdir()

    def link(i: int) -> None:  # the same pixels under a new name: nothing to generate
        os.link(slide, slides / f"s{i:03d}.svs")

    for i in range(3):
        link(i)
    cal = _tile(slides, tmp_path / "ref", "--workers", "1")
    _, err = cal.communicate(timeout=300)
    assert cal.returncode == 0, err
    done = json.loads((tmp_path / "ref" / "hpcpath-manifest.json").read_text())["slides"].values()
    span = max(m["finished"] for m in done) - min(m["finished"] - m["seconds"] for m in done)
    n = min(max(math.ceil(WORK_S * 3 / span), 6), 60)
    for i in range(3, n):
        link(i)

    name = f"hpcpath-wt{os.getpid()}"
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({
        "backend": "slurm", "jobs": 1, "cores": 1, "memory": "2GB", "walltime": "00:01:00",
        "python": sys.executable, "job_name": name, "log_directory": str(tmp_path / "jobs"),
        "worker_timeout": 120}))
    ref = _tile(slides, tmp_path / "ref", "--workers", "1")  # the reference's rest, on the other core
    run = _tile(slides, tmp_path / "out", "--cluster", str(spec))
    seen: dict[str, list[float]] = {}  # job id -> [first, last] time seen in the queue
    idle_since = None
    try:
        while run.poll() is None:
            now = time.time()
            jobs = _squeue(name)
            for job in jobs:
                seen.setdefault(job, [now, now])[1] = now
            if jobs or not seen:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            assert idle_since is None or now - idle_since < 90, (
                f"no worker job in the queue for 90 s after job(s) {sorted(seen)} ended: "
                "no replacement was submitted")
            assert now - min((t[0] for t in seen.values()), default=now) < 600, "run too slow"
            time.sleep(0.5)
        _, stderr = run.communicate(timeout=60)
        _, ref_err = ref.communicate(timeout=600)
    finally:
        for p in (run, ref):
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert ref.returncode == 0, ref_err

    # (c) the user sees the usual one-line messages and nothing else
    assert run.returncode == 0, stderr
    assert "Traceback" not in stderr and "WARNING" not in stderr and "ERROR" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert all(ln.startswith(("hpcpath: ", "[tile] ")) for ln in lines), stderr
    assert f"hpcpath: {n} tiled (0 already complete), 0 empty, 0 failed" in stderr, stderr

    # (a) real Slurm jobs, one after the other: the first retired on its own (lifetime, derived
    # from the walltime) while slides were still left, and a second job finished the run
    ids = sorted(seen, key=int)
    assert len(ids) >= 2, f"only Slurm job(s) {ids}: the run ended within the first job"
    first, second = ids[0], ids[1]
    assert seen[first][1] < seen[second][0], seen  # one at a time: the second replaced the first
    logs = {p.stem.rsplit("-", 1)[1]: p.read_text() for p in (tmp_path / "jobs").glob(f"{name}-*.err")}
    assert set(ids) <= set(logs), (ids, sorted(logs))
    assert "worker-lifetime-reached" in logs[first], logs[first]
    assert "DUE TO TIME LIMIT" not in logs[first], logs[first]
    manifest = json.loads((tmp_path / "out" / "hpcpath-manifest.json").read_text())["slides"]
    after = [s for s, m in manifest.items() if m["finished"] > seen[first][1]]
    assert after, "every slide finished before the first job ended"

    # (b) every store complete, file for file equal to the LocalCluster run
    assert len(manifest) == n and all(m["status"] == "complete" for m in manifest.values())
    for i in range(n):
        store = f"s{i:03d}.zarr"
        assert is_complete(tmp_path / "out" / store)
        assert _files(tmp_path / "out" / store) == _files(tmp_path / "ref" / store), store

"""Faults while a run writes: the disk fills up, the output folder turns read-only, a slide is
truncated under the tiler.  Each gives one line per slide on the terminal and no traceback
(the details go to OUT/hpcpath-logs/), nothing is marked complete that is not, and a rerun
once the fault is gone gives the same stores as a clean run.

Real filesystems: a small tmpfs mounted as root (``mount -t tmpfs -o size=...``), remounted
larger ("space freed") or read-only mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_resource

from hpcpath.store import is_complete, open_store

pytestmark = pytest.mark.slow

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
# small tiles and tasks: many tasks per slide, so a fault lands mid-run
OPTS = ["--workers", "1", "--tile-size", "128", "--chunk-tiles", "16", "--tiles-per-task", "16",
        "--no-pyramid"]


@contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        missing_resource("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        missing_resource(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, opts: str, tries: int = 100) -> None:
    """``mount -o remount,OPTS``; a file open for writing makes a read-only remount busy, so
    it is retried for a few seconds."""
    for _ in range(tries):
        r = subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"remount {opts} failed: {r.stderr}")


def tile(slides: Path, out: Path, *extra: str, timeout: int = 300, wait=True):
    args = [*HPCPATH, "tile", str(slides), "-o", str(out), *OPTS, *extra]
    if not wait:
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def wait_for_first_tile(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(out.glob("*.zarr/tiles/images/c.*")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no tile written")


def assert_clean_terminal(stderr: str, slide_ids: list[str], reason: str) -> None:
    """No traceback; exactly one failure line per failed slide, naming its file and reason."""
    assert "Traceback" not in stderr and "  File \"" not in stderr, stderr
    for sid in slide_ids:
        lines = [ln for ln in stderr.splitlines() if f"{sid}.svs:" in ln]
        assert len(lines) == 1 and reason in lines[0], stderr


def assert_same_stores(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.zarr"))
    assert names and names == sorted(p.name for p in b.glob("*.zarr"))
    for name in names:
        x, y = open_store(a / name), open_store(b / name)
        np.testing.assert_array_equal(x.index, y.index)
        np.testing.assert_array_equal(x.tissue_fraction, y.tissue_fraction)
        np.testing.assert_array_equal(x.tiles[:], y.tiles[:])


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fault-slides")
    subprocess.run([*HPCPATH, "synth", "-o", str(d), "-n", "2", "--size", "4096x4096"],
                   check=True, capture_output=True, timeout=300)
    return d


@pytest.fixture(scope="module")
def clean(slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault-clean") / "out"
    r = tile(slides, out)
    assert r.returncode == 0, r.stderr
    return out


def test_disk_full_mid_write_then_rerun_after_space_is_freed(slides, clean, tmp_path):
    with tmpfs(tmp_path / "fs", "3m") as fs:
        out = fs / "out"
        r = tile(slides, out)
        assert r.returncode in (1, 2), r.stderr  # 2: the manifest itself could not be written
        assert_clean_terminal(r.stderr, ["slide_000", "slide_001"], "No space left on device")
        if r.returncode == 2:
            assert r.stderr.strip().splitlines()[-1].endswith(
                "hpcpath-manifest.json: cannot write the manifest: No space left on device")
        assert not any(is_complete(p) for p in out.glob("*.zarr"))
        if (out / "hpcpath-manifest.json").exists():
            manifest = json.loads((out / "hpcpath-manifest.json").read_text())
            assert all(s["status"] == "failed" for s in manifest["slides"].values())
        logs = "".join(p.read_text(errors="replace") for p in (out / "hpcpath-logs").glob("*.log"))
        assert "Traceback" in logs and "No space left on device" in logs  # the details

        remount(fs, "size=300m")  # space freed
        r = tile(slides, out)
        assert r.returncode == 0, r.stderr
        assert "2 tiled" in r.stderr
        assert_same_stores(clean, out)


def test_log_folder_on_a_full_disk_keeps_the_terminal_clean(slides, tmp_path):
    """Not a byte left: the worker log file cannot be written either.  Nothing crashes, each
    slide fails in one line, and the manifest that cannot be written is said in one line."""
    with tmpfs(tmp_path / "fs", "1m") as fs:
        out = fs / "out"
        (out / "hpcpath-logs").mkdir(parents=True)
        with open(fs / "filler", "wb") as f:  # fill the disk
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        r = tile(slides, out)
        assert r.returncode in (1, 2), r.stderr
        assert "Traceback" not in r.stderr and "  File \"" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith(("[tile]", "hpcpath: dashboard"))]
        assert lines and all(ln.startswith("hpcpath: ") for ln in lines), r.stderr
        assert any("No space left on device" in ln for ln in lines), r.stderr
        assert not any(is_complete(p) for p in out.glob("*.zarr"))


def test_output_folder_turning_read_only_mid_run(slides, clean, tmp_path):
    """The folder goes read-only after the first tile is written: one line per slide that was
    still being written, the manifest error in one line, no store marked complete; once the
    folder is writable again a rerun completes identical to a clean run."""
    logs = tmp_path / "logs"  # the worker log stays writable (a remount is refused while a
    logs.mkdir()  # file on it is open for writing, and the log is always open)
    with tmpfs(tmp_path / "fs", "300m") as fs:
        out = fs / "out"
        (out / "hpcpath-logs").mkdir(parents=True)
        subprocess.run(["mount", "--bind", str(logs), str(out / "hpcpath-logs")], check=True)
        try:
            proc = tile(slides, out, wait=False)
            wait_for_first_tile(out, proc)
            remount(fs, "ro")
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode != 0, stderr
            assert "Traceback" not in stderr and "  File \"" not in stderr, stderr
            failed = [ln for ln in stderr.splitlines() if ".svs:" in ln]
            assert failed and all("Read-only file system" in ln for ln in failed), stderr
            assert stderr.strip().splitlines()[-1] == (
                f"hpcpath: error: {out}/hpcpath-manifest.json: cannot write the manifest: "
                "Read-only file system")
            assert not any(is_complete(p) for p in out.glob("*.zarr"))
            assert "Read-only file system" in "".join(p.read_text() for p in logs.glob("*.log"))

            remount(fs, "rw")
            r = tile(slides, out)
            assert r.returncode == 0, r.stderr
            assert_same_stores(clean, out)
        finally:
            subprocess.run(["umount", "-l", str(out / "hpcpath-logs")], capture_output=True)


def test_slide_truncated_while_being_tiled(slides, tmp_path):
    """A slide cut short under the tiler (a copy still arriving, a disk error) fails in one
    line with the decoder's reason; the log has the details; the store is not complete."""
    src = tmp_path / "slides"
    src.mkdir()
    shutil.copy(slides / "slide_000.svs", src / "slide_000.svs")
    out = tmp_path / "out"
    proc = tile(src, out, wait=False)
    wait_for_first_tile(out, proc)
    victim = src / "slide_000.svs"
    os.truncate(victim, victim.stat().st_size // 3)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert_clean_terminal(stderr, ["slide_000"], "")
    assert not is_complete(out / "slide_000.zarr")
    manifest = json.loads((out / "hpcpath-manifest.json").read_text())
    assert manifest["slides"]["slide_000"]["status"] == "failed"
    logs = "".join(p.read_text(errors="replace") for p in (out / "hpcpath-logs").glob("*.log"))
    assert "Traceback" in logs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _scheduler_and_worker(port: int, cwd: Path):
    """A ``dask scheduler`` and one ``dask worker``, as a batch script would start them."""
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    sched = subprocess.Popen([*dask, "--host", "127.0.0.1", "--port", str(port),
                              "--dashboard-address", "127.0.0.1:0"], cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker",
                               f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--nworkers", "1"],
                              cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield sched
    finally:
        for p in (worker, sched):
            if p.poll() is None:
                p.terminate()
        for p in (worker, sched):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_dask_scheduler_killed_mid_run_is_one_line_and_a_rerun_resumes(slides, clean, tmp_path):
    """SIGKILL of the scheduler (its node or job gone): after the client's reconnect window
    (worker_timeout) the CLI says so in one line; nothing more is marked complete; a rerun
    against a new scheduler completes identical to a clean run."""
    port = _free_port()
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"backend: scheduler\naddress: tcp://127.0.0.1:{port}\nworker_timeout: 15\n")
    out = tmp_path / "out"
    args = [*HPCPATH, "tile", str(slides), "-o", str(out), *OPTS[2:], "--cluster", str(spec)]
    with _scheduler_and_worker(port, tmp_path) as sched:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_first_tile(out, proc)
        sched.kill()
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    said = [ln for ln in stderr.strip().splitlines() if not ln.startswith(("[tile]", "hpcpath: dashboard"))]
    assert said == [
        f"hpcpath: error: lost the Dask scheduler tcp://127.0.0.1:{port} mid-run (killed, or its "
        "node or job ended): nothing more was marked complete; rerun the same command to resume"], stderr
    assert not any(is_complete(p) for p in out.glob("*.zarr"))
    with _scheduler_and_worker(port, tmp_path):
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_stores(clean, out)

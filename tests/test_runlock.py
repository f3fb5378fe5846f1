"""One run per output folder: a second run is refused in one line naming the first; a killed
run's lock is taken over; locks of other hosts age out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcpath.runlock import LOCK_NAME, STALE_AFTER, RunLockedError, is_stale, run_lock

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]

_HOLD = """
import sys, time
from hpcpath.runlock import run_lock
with run_lock(sys.argv[1], "hpcpath tile"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(out: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    first = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as info:
            with run_lock(tmp_path, "hpcpath tile"):
                pass
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"{tmp_path.resolve()}: in use by hpcpath tile")
        assert f"pid {first.pid} on {socket.gethostname()}" in msg
    finally:
        first.kill()
        first.wait()
    # the first run was killed (SIGKILL: no cleanup); its lock is stale and taken over
    assert (tmp_path / LOCK_NAME).exists()
    with run_lock(tmp_path, "hpcpath tile"):
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit


def test_reentrant_in_one_process_and_released_by_the_outermost(tmp_path):
    with run_lock(tmp_path, "hpcpath tile"):
        with run_lock(tmp_path, "hpcpath tile"):
            assert (tmp_path / LOCK_NAME).exists()
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_other_hosts_locks_age_out(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"host": "n7-elsewhere", "pid": 1, "command": "hpcpath infer",
                                "started": time.time()}))
    with pytest.raises(RunLockedError, match="hpcpath infer \\(pid 1 on n7-elsewhere"):
        with run_lock(tmp_path):
            pass
    old = time.time() - STALE_AFTER - 60  # no heartbeat for longer than STALE_AFTER
    os.utime(lock, (old, old))
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert is_stale({"host": "x", "pid": 1, "age": 1.0}, host="y") is False


@pytest.mark.slow
def test_two_tile_runs_on_one_folder(tmp_path):
    """The second `hpcpath tile` on a folder in use exits 2 with one line; the first is
    untouched and complete; after the first is killed, a rerun takes over and completes."""
    subprocess.run([*HPCPATH, "synth", "-o", str(tmp_path / "slides"), "-n", "2", "--size", "4096x4096"],
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    args = [*HPCPATH, "tile", str(tmp_path / "slides"), "-o", str(out), "--workers", "1"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"hpcpath: error: {out.resolve()}: in use by hpcpath tile (pid {first.pid} on ")
    assert "Traceback" not in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert not (out / LOCK_NAME).exists()
    manifest = json.loads((out / "hpcpath-manifest.json").read_text())
    assert {r["status"] for r in manifest["slides"].values()} == {"complete"}

    # a run killed with its workers leaves its lock behind; the next run takes it over
    for p in out.glob("*.zarr"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    killed = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (out / LOCK_NAME).exists()
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "2 tiled" in rerun.stderr

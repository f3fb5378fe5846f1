"""The ``hpcpath`` command as a user runs it: exit codes, one-line errors, kill and rerun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from hpcpath.errors import HpcpathError
from hpcpath.store import open_store

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]


def run(*args, timeout=300, **kw):
    return subprocess.run([*HPCPATH, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def test_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    proc = run("--help")
    assert proc.returncode == 0 and "tile" in proc.stdout and "synth" in proc.stdout
    assert time.perf_counter() - t0 < 15


def test_bad_inputs_get_one_line_each_and_good_slides_finish(tmp_path, test_data):
    proc = run("tile", test_data / "bad", test_data / "slides" / "cmu-1-small-region.svs",
               "/no/such/slide.svs", "-o", tmp_path, "--workers", "1")
    _no_traceback(proc)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    for name in ("broken.svs", "kidney-48-5.tif", "not-a-wsi.dcm"):
        hits = [ln for ln in lines if str(test_data / "bad" / name) in ln]
        assert len(hits) == 1 and hits[0].startswith("hpcpath: ")
    assert "hpcpath: /no/such/slide.svs: no such file or folder" in lines
    assert open_store(tmp_path / "cmu-1-small-region.zarr").complete
    assert "dashboard http://127.0.0.1:" in proc.stderr


def test_small_and_blank_slides_warn_and_exit_nonzero(tmp_path, test_data):
    blank = tmp_path / "blank"
    assert run("synth", "-o", blank, "-n", "1", "--size", "2048x2048", "--blank").returncode == 0
    proc = run("tile", blank / "slide_000.svs", test_data / "slides" / "small.svs", "-o", tmp_path / "out", "--workers", "1")
    _no_traceback(proc)
    assert proc.returncode == 1
    assert any("small.svs: slide is smaller than one tile" in ln for ln in proc.stderr.splitlines())
    assert any("slide_000.svs: no tissue found" in ln for ln in proc.stderr.splitlines())
    assert len(open_store(tmp_path / "out" / "slide_000.zarr")) == 0
    again = run("tile", blank / "slide_000.svs", "-o", tmp_path / "out", "--workers", "1", "--allow-empty")
    assert again.returncode == 0, again.stderr


def test_unwritable_output_and_config_typos_are_usage_errors(tmp_path, test_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    slide = test_data / "slides" / "small.svs"
    proc = run("tile", slide, "-o", blocker / "out")
    _no_traceback(proc)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"hpcpath: error: {blocker / 'out'}: output folder is not writable")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tile:\n  tile_size: big\n")
    proc = run("tile", slide, "-o", tmp_path / "o", "--config", cfg)
    _no_traceback(proc)
    assert proc.returncode == 2 and proc.stderr.strip() == f"hpcpath: error: {cfg}: tile.tile_size: Input should be a valid integer, unable to parse string as an integer"
    proc = run("tile", slide, "-o", tmp_path / "o", "--overlap", "300")
    assert proc.returncode == 2 and "overlap must be smaller than tile_size" in proc.stderr
    proc = run("tile", slide, "-o", tmp_path / "o", "--cluster", tmp_path / "missing.yaml")
    _no_traceback(proc)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def _store_snapshot(path: Path) -> dict:
    root = zarr.open_group(str(path), mode="r")
    snap = {"attrs": dict(root.attrs)}

    def walk(group, prefix=""):
        for name, arr in group.arrays():
            snap[prefix + name] = (dict(arr.attrs), arr[...])
        for name, sub in group.groups():
            snap[prefix + name + "/"] = dict(sub.attrs)
            walk(sub, prefix + name + "/")

    walk(root)
    return snap


@pytest.mark.slow
def test_kill_midway_then_rerun_equals_uninterrupted(tmp_path):
    slides = tmp_path / "slides"
    assert run("synth", "-o", slides, "-n", "1", "--size", "16384x16384", "--seed", "3").returncode == 0
    slide = slides / "slide_000.svs"
    ref = run("tile", slide, "-o", tmp_path / "ref", "--workers", "1")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([*HPCPATH, "tile", str(slide), "-o", str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    images = out / "slide_000.zarr" / "tiles" / "images"
    deadline = time.time() + 120
    while time.time() < deadline and not any(images.glob("c.*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers, mid-write
    proc.wait()
    assert any(images.glob("c.*")), "the run never started writing tiles"
    with pytest.raises(HpcpathError, match="incomplete"):
        open_store(out / "slide_000.zarr")

    rerun = run("tile", slide, "-o", out, "--workers", "1")
    assert rerun.returncode == 0, rerun.stderr
    a, b = _store_snapshot(out / "slide_000.zarr"), _store_snapshot(tmp_path / "ref" / "slide_000.zarr")
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], tuple):
            assert a[key][0] == b[key][0], key
            np.testing.assert_array_equal(a[key][1], b[key][1], err_msg=key)
        else:
            assert a[key] == b[key], key
    # and a third run skips it
    third = run("tile", slide, "-o", out, "--workers", "1")
    assert third.returncode == 0 and "1 already complete" in third.stderr

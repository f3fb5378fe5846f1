"""Hostile slide file names and output names never write outside the output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcpath.io.slide import safe_name, slide_id_for

HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]

HOSTILE = [
    "a b;touch x", "-rf", ".", "..x", "$(id)", "`id`", "x" * 200, "ünïcødé", "a\uff0fb",  # full-width /
    "tab\there", "new\nline", "CaseA", "casea",
]


@pytest.mark.parametrize("raw", [*HOSTILE, "../../etc/passwd", "/abs/path", "nul\x00byte", "..", "~root"])
def test_safe_name_is_one_harmless_component(raw):
    name = safe_name(raw)
    assert name and "/" not in name and "\\" not in name and "\x00" not in name
    assert name not in (".", "..") and name[0] not in ".-"
    assert all(c.isprintable() for c in name)
    assert len(name.encode()) <= 100
    assert Path(name).name == name  # one component


def test_long_names_stay_apart():
    a, b = safe_name("x" * 200 + "a"), safe_name("x" * 200 + "b")
    assert a != b


@pytest.mark.slow
def test_tile_hostile_file_names_stay_inside_out(tmp_path):
    subprocess.run([*HPCPATH, "synth", "-o", str(tmp_path / "synth"), "-n", "1", "--size", "2048x2048"],
                   check=True, capture_output=True, timeout=300)
    src = tmp_path / "synth" / "slide_000.svs"
    slides = tmp_path / "slides"
    slides.mkdir()
    for raw in HOSTILE:
        shutil.copy(src, slides / f"{raw}.svs")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    before = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts}
    proc = subprocess.run([*HPCPATH, "tile", str(slides), "-o", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path / "work")
    assert "Traceback" not in proc.stderr
    after = {p for p in tmp_path.rglob("*") if "out" not in p.relative_to(tmp_path).parts}
    assert after == before, sorted(map(str, after - before))  # nothing written outside OUT
    assert not Path("x").exists() and not (tmp_path / "work" / "x").exists()
    for p in out.rglob("*"):
        assert out.resolve() in p.resolve().parents
    manifest = json.loads((out / "hpcpath-manifest.json").read_text())["slides"]
    stores = {p.name for p in out.iterdir() if p.suffix == ".zarr"}
    for raw in HOSTILE:
        sid = slide_id_for(slides / f"{raw}.svs")
        rec = manifest[sid]
        if raw.casefold() == "casea":  # one folder on a case-insensitive file system: refused
            assert rec["status"] == "failed" and "shared by 2 inputs" in rec["error"]
        else:
            assert rec["status"] == "complete", (raw, rec)
            assert f"{sid}.zarr" in stores
    assert all(not s.startswith((".", "-")) for s in stores)
    assert proc.returncode == 1  # the two case-twins failed


@pytest.mark.parametrize("cmd", [
    ["infer", "--model", "M", "S", "-o", "O", "--name", "../escape"],
    ["dataset", "build", "S", "-o", "d.json", "--name", ".."],
])
def test_hostile_output_names_are_refused_in_one_line(tmp_path, cmd):
    (tmp_path / "M").mkdir()
    (tmp_path / "S").mkdir()
    proc = subprocess.run([*HPCPATH, *cmd], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcpath: error:") and "name" in lines[0], proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["M", "S"]

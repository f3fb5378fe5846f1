"""Installs that hold: bin/setup on a machine that lacks Debian's python3-venv, and the conda
environment files naming the same extras as the README and bin/setup."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]


def _python_without_ensurepip(root: Path) -> Path:
    """A Python like Debian's python3 without python3-venv: this interpreter's binary with a
    standard library that lacks ``ensurepip`` (Debian ships it in python3-venv), so
    ``python3 -m venv`` fails the way it does there."""
    import sysconfig

    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prefix = root / "py"
    (prefix / "bin").mkdir(parents=True)
    shutil.copy2(base, prefix / "bin" / base.name)  # a copy: Python finds its prefix from here
    lib = prefix / "lib" / stdlib.name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "ensurepip":
            (lib / entry.name).symlink_to(entry)
    (prefix / "bin" / "python3").symlink_to(base.name)
    return prefix / "bin" / "python3"


def test_setup_without_python3_venv_says_so_in_one_line(tmp_path):
    fake = _python_without_ensurepip(tmp_path)
    probe = subprocess.run([str(fake), "-m", "venv", str(tmp_path / "probe")], capture_output=True, text=True)
    assert probe.returncode != 0 and "ensurepip" in probe.stdout + probe.stderr  # venv really fails

    clone = tmp_path / "clone"  # a fresh checkout: bin/setup and no .venv
    (clone / "bin").mkdir(parents=True)
    shutil.copy2(REPO / "bin" / "setup", clone / "bin" / "setup")
    shutil.copy2(REPO / "pyproject.toml", clone / "pyproject.toml")
    p = subprocess.run(["bash", str(clone / "bin" / "setup"), "dev"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "PYTHON": str(fake)}, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("setup: error: ") and "python3-venv" in lines[0], lines[0]
    assert "Traceback" not in p.stderr + p.stdout
    assert not (clone / ".venv").exists()  # nothing half-made that a rerun would trust


def test_setup_without_python_names_what_to_install(tmp_path):
    clone = tmp_path / "clone"
    (clone / "bin").mkdir(parents=True)
    shutil.copy2(REPO / "bin" / "setup", clone / "bin" / "setup")
    p = subprocess.run(["bash", str(clone / "bin" / "setup")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHON": "python3.999"}, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "python3-venv" in p.stderr and "PYTHON" in p.stderr


def _extras(spec: str) -> set[str]:
    m = re.search(r"\.\[([a-z0-9_,-]+)\]", spec)
    assert m, spec
    return set(m.group(1).split(","))


def _conda_pip_extras(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    pips = [d["pip"] for d in doc["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1 and len(pips[0]) == 1, pips
    return _extras(pips[0][0])


def test_conda_environments_name_the_readme_and_setup_extras():
    """environment.yml (CPU) and environment-gpu.yml install what bin/setup installs for the
    demo and the tests (dev,train; gpu in place of train), plus slurm, and the README says
    so; every extra exists in pyproject.toml."""
    defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    cpu = _conda_pip_extras(REPO / "environment.yml")
    gpu = _conda_pip_extras(REPO / "environment-gpu.yml")
    setup_calls = re.findall(r"bin/setup ([a-z,]+)", (REPO / "bin" / "demo").read_text()
                             + (REPO / "bin" / "test").read_text())
    assert setup_calls
    for call in setup_calls:
        assert set(call.split(",")) <= cpu, (call, cpu)
    assert "train" in cpu and "slurm" in cpu
    assert gpu == (cpu - {"train"}) | {"gpu"}
    readme = (REPO / "README.md").read_text()
    conda = readme.split("## Conda", 1)[1].split("\n## ", 1)[0]
    assert "conda env create -f environment.yml" in conda
    assert "conda env create -f environment-gpu.yml" in conda
    assert {frozenset(_extras(s)) for s in re.findall(r"\.\[[a-z,]+\]", conda)} == {frozenset(cpu), frozenset(gpu)}
    assert (cpu | gpu) <= defined

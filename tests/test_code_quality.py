"""Lint, type check and the import-layer contract, as CI runs them (config in pyproject.toml:
[tool.ruff], [tool.mypy], [tool.importlinter]).  Each must exit 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(*cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    exe = BIN / cmd[0] if (BIN / cmd[0]).exists() else shutil.which(cmd[0])
    if exe is None:
        pytest.fail(f"{cmd[0]} is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_ruff():
    proc = _run("ruff", "check", "hpcpath", "tests", "benchmarks")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_import_layers():
    proc = _run("lint-imports")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.slow
def test_mypy():
    proc = _run("mypy", "hpcpath")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]

"""Dask across the nodes of a real two-node Slurm (``local_slurm2``: n1 and n2, each with its
own hostname, address and node-local /tmp).  What one node cannot catch: anything passed
between nodes through node-local paths, addresses other nodes must dial, a node lost mid-run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(env: dict[str, str], *cmd: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        cmd, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def test_nodes_have_own_hostname_address_and_tmp(local_slurm2, shared_tmp):
    out = _run(
        local_slurm2,
        "srun", "-N2", "-n2", "--gres=gpu:1", "bash", "-c",
        'echo "$(hostname) $(hostname -I) $CUDA_VISIBLE_DEVICES $(getent hosts n1 n2 | wc -l)";'
        ' echo x > /tmp/mark-$SLURM_JOB_ID-$(hostname);'
        f' ls /tmp | grep -c mark-$SLURM_JOB_ID; touch {shared_tmp}/$(hostname)',
        cwd=shared_tmp,
    )
    lines = sorted(out.split("\n"))
    rows = sorted(line.split() for line in lines if " " in line)
    assert rows == [["n1", "10.77.0.11", "0", "2"], ["n2", "10.77.0.12", "0", "2"]]
    assert [line for line in lines if line.strip() and " " not in line] == ["1", "1"]
    assert sorted(p.name for p in shared_tmp.iterdir()) == ["n1", "n2"]

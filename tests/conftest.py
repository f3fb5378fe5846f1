"""Shared fixtures.

Test tiers: pure tests run everywhere; tests that use ``local_slurm`` (marked ``slurm``
automatically) run against a real Slurm started by ``bin/local-slurm``; tests that use
``test_data`` read the real slides in ``../shared/data``.  Where such a resource is missing
the test is skipped with the reason, except under CI (``CI`` set), where it fails: CI must
run every tier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from distributed import Client

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("HPCPATH_SLURM_DIR", "/tmp/hpcpath-slurm"))
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing_resource(reason: str) -> None:
    """Skip the test, or fail it under CI, where every tier must run."""
    if _in_ci():
        pytest.fail(
            f"{reason} (CI is set: missing resources fail instead of skipping)", pytrace=False
        )
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "local_slurm" in names or "local_slurm2" in names:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[dict[str, str]]:
    """A running local Slurm (started once, reused if already up); yields its environment.

    The daemons keep running after the session, so the next run starts instantly; stop them
    with ``bin/local-slurm stop``.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=search) is None]
    if missing:
        missing_resource(
            f"Slurm is not installed (no {', '.join(missing)}): "
            "apt-get install -y slurmctld slurmd slurm-client munge"
        )
    proc = subprocess.run(
        [str(REPO / "bin" / "local-slurm"), "start", str(SLURM_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode:
        pytest.fail(f"bin/local-slurm start failed:\n{proc.stderr}{proc.stdout}", pytrace=False)
    env = {"SLURM_CONF": str(SLURM_DIR / "slurm.conf"), "HPCPATH_SLURM_DIR": str(SLURM_DIR)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


SLURM2_DIR = Path(os.environ.get("HPCPATH_SLURM2_DIR", "/var/tmp/hpcpath-slurm2"))
NODE_BINARIES = ("ip", "unshare", "nsenter")


@pytest.fixture(scope="session")
def local_slurm2() -> dict[str, str]:
    """A running two-node Slurm (``bin/local-slurm start --nodes 2``); returns its environment.

    Nodes n1 (10.77.0.11) and n2 (10.77.0.12), each a slurmd in its own network, UTS and mount
    namespace (own hostname, node-local /tmp), gpu:2 each.  Unlike ``local_slurm`` it does not
    set ``SLURM_CONF`` in this process (both clusters may serve one session): pass
    ``{**os.environ, **local_slurm2}`` to the Slurm commands.  Job directories must be on a
    shared path such as ``shared_tmp`` -- /tmp differs per node.  The daemons keep running
    after the session; stop them with ``bin/local-slurm stop --nodes 2``.
    """
    if REPO.resolve().is_relative_to("/tmp"):
        pytest.fail(f"the two-node Slurm's nodes each have their own /tmp, so they cannot run "
                    f"{REPO} or its Python: put the checkout outside /tmp", pytrace=False)
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [b for b in SLURM_BINARIES + NODE_BINARIES if shutil.which(b, path=search) is None]
    if missing:
        missing_resource(
            f"multi-node Slurm needs {', '.join(missing)}: "
            "apt-get install -y slurmctld slurmd slurm-client munge iproute2 util-linux"
        )
    proc = subprocess.run(
        [str(REPO / "bin" / "local-slurm"), "start", "--nodes", "2", str(SLURM2_DIR)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode:
        pytest.fail(
            f"bin/local-slurm start --nodes 2 failed:\n{proc.stderr}{proc.stdout}", pytrace=False
        )
    return {"SLURM_CONF": str(SLURM2_DIR / "slurm.conf"), "HPCPATH_SLURM2_DIR": str(SLURM2_DIR)}


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh directory every node of ``local_slurm2`` sees (under /var/tmp, not /tmp)."""
    root = Path("/var/tmp/hpcpath-tests")
    root.mkdir(mode=0o1777, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="t-", dir=root))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Client]:
    """A small local Dask cluster (2 worker processes on 127.0.0.1) for the whole session."""
    from hpcpath.cluster import cluster_client

    with cluster_client({"backend": "local", "n_workers": 2}) as client:
        yield client


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The shared real test data (``$HPCPATH_TEST_DATA``, default ``<repo>/../shared/data``)."""
    path = Path(os.environ.get("HPCPATH_TEST_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        missing_resource(f"test data not found at {path} (set HPCPATH_TEST_DATA)")
    return path


def tiny_model(path: Path, patch: int, pool: int, classes: tuple[str, ...], task: str | None = None) -> Path:
    """A tiny untrained, seeded CNN saved with hpcpath's model contract: for tests whose
    predictions only need to be reproducible (cluster runs compared with local ones)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from keras import layers

    from hpcpath.modelio import ModelMeta, save_model

    keras.utils.set_random_seed(0)
    inp = keras.Input((patch, patch, 3), dtype="uint8")
    h = layers.AveragePooling2D(pool)(layers.Rescaling(1 / 255)(inp))
    h = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, activation="relu")(h))
    net = keras.Model(inp, layers.Dense(1, activation="sigmoid")(h))
    meta = ModelMeta(patch_size=patch, classes=classes, task=task or "binary")
    return save_model(net, path, meta)


def cli_dataset(root: Path, n: int, size: str, seed: int) -> Path:
    """A small tumour dataset made the user's way - ``hpcpath synth``, ``tile`` (64-px tiles),
    ``dataset build`` split half train / half val - under ``root``; returns the manifest."""
    import sys

    import yaml

    split = root / "split.yaml"
    split.write_text(yaml.safe_dump({"dataset": {"split": {"fractions": [0.5, 0.5, 0.0]}}}))
    for args in (["synth", "-o", root / "slides", "-n", str(n), "--size", size, "--seed", str(seed)],
                 ["tile", root / "slides", "-o", root / "stores", "--tile-size", "64", "--workers", "1"],
                 ["dataset", "build", root / "stores", "-a", root / "slides", "-o", root / "tumor.json",
                  "--config", split, "--workers", "1"]):
        proc = subprocess.run([sys.executable, "-m", "hpcpath.cli.main", *map(str, args)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "tumor.json"


SPARK_DIR = Path(os.environ.get("HPCPATH_SPARK_DIR", "/tmp/hpcpath-spark"))


@pytest.fixture(scope="session")
def local_spark() -> Iterator[dict[str, str]]:
    """A standalone Spark cluster (``bin/local-spark``: a master and two workers with two fake
    GPUs each, addresses 0-1 and 2-3), started once per session and stopped at its end.
    Yields ``master`` (spark://...), ``dir`` (its state folder) and ``gpu_script`` (a GPU
    discovery script for the application's executors)."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        missing_resource("Spark needs Java: apt-get install -y openjdk-17-jre-headless")
    pytest.importorskip("pyspark")
    tool = str(REPO / "bin" / "local-spark")
    proc = subprocess.run([tool, "start", str(SPARK_DIR)], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        pytest.fail(f"bin/local-spark start failed:\n{proc.stderr}{proc.stdout}", pytrace=False)
    env = subprocess.run([tool, "env", str(SPARK_DIR)], capture_output=True, text=True, check=True).stdout
    master = env.strip().rpartition("=")[2]
    try:
        yield {"master": master, "dir": str(SPARK_DIR), "gpu_script": str(SPARK_DIR / "gpus-1.sh")}
    finally:
        subprocess.run([tool, "stop", str(SPARK_DIR)], capture_output=True, text=True, timeout=120)

"""hpcpath.cluster: spec parsing (pure), a LocalCluster round trip, and real Slurm runs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pydantic
import pytest

from hpcpath._malloc import arena_count
from hpcpath.cluster import (
    ENV_VAR,
    ClusterError,
    LocalSpec,
    SchedulerSpec,
    SlurmSpec,
    cluster_client,
    dashboard_link,
    dask_setup,
    parse_cluster_spec,
    slurm_cluster_kwargs,
)
from hpcpath.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- parsing


def test_parse_strings() -> None:
    assert parse_cluster_spec("local") == LocalSpec()
    assert parse_cluster_spec(" slurm ") == SlurmSpec(backend="slurm")
    spec = parse_cluster_spec("tcp://10.1.2.3:8786")
    assert isinstance(spec, SchedulerSpec) and spec.address == "tcp://10.1.2.3:8786"
    assert parse_cluster_spec(None) == LocalSpec(backend="auto")  # one slide inline, more: a LocalCluster
    assert parse_cluster_spec("auto") == LocalSpec(backend="auto")
    assert parse_cluster_spec(spec) is spec


def test_parse_unknown_string() -> None:
    with pytest.raises(ConfigError, match="'sge' is not 'local', 'slurm'"):
        parse_cluster_spec("sge")


def test_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "slurm")
    assert parse_cluster_spec(None).backend == "slurm"
    assert parse_cluster_spec("local").backend == "local"  # explicit beats the environment
    path = write(tmp_path, "backend: slurm\njobs: 3\n")
    monkeypatch.setenv(ENV_VAR, str(path))
    assert parse_cluster_spec(None) == SlurmSpec(backend="slurm", jobs=3)
    monkeypatch.setenv(ENV_VAR, "")
    assert parse_cluster_spec(None) == LocalSpec(backend="auto")
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ConfigError, match=rf"^\${ENV_VAR}: 'nonsense'"):
        parse_cluster_spec(None)


def test_yaml_top_level_and_under_cluster_key(tmp_path: Path) -> None:
    flat = write(tmp_path, "backend: slurm\npartition: gpu\ngpus_per_job: 2\n", "a.yaml")
    nested = write(
        tmp_path,
        "tiling: {size: 256}\ncluster:\n  backend: slurm\n  queue: gpu\n  gpus_per_job: 2\n",
        "b.yml",
    )
    a, b = parse_cluster_spec(flat), parse_cluster_spec(nested)
    assert a == b
    assert isinstance(a, SlurmSpec)
    assert (a.partition, a.worker_processes, a.job_cores, a.gpus_per_worker) == ("gpu", 2, 2, 1)
    assert parse_cluster_spec(Path(flat)) == a


def test_typo_key_names_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "backend: slurm\ncors: 4\n")
    with pytest.raises(ConfigError) as info:
        parse_cluster_spec(str(path))
    message = str(info.value)
    assert message == f"{path}: cors: unknown option (did you mean 'cores'?)"
    assert info.value.path == str(path)
    nested = write(tmp_path, "cluster:\n  backend: local\n  n_worker: 2\n", "n.yaml")
    with pytest.raises(
        ConfigError, match=r"n\.yaml: cluster\.n_worker: unknown option \(did you mean 'n_workers'"
    ):
        parse_cluster_spec(nested)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("backend: slurm\ncores: two\n", "cores: Input should be a valid integer"),
        ("backend: slurm\nmemory: lots\n", "memory: 'lots' is not a size"),
        ("backend: slurm\nwalltime: 2h\n", "walltime: '2h' is not a Slurm time"),
        (
            "backend: slurm\njob_script_prologue: module load cuda\n",
            "job_script_prologue: Input should be a valid list",
        ),
        ("backend: local\nn_workers: 0\n", "n_workers: Input should be greater than or equal to 1"),
        (
            "backend: sge\n",
            "backend: unknown backend 'sge'; expected one of local, slurm, scheduler, spark",
        ),
        ("cores: 2\n", "backend: missing; expected one of local, slurm, scheduler, spark"),
        ("backend: scheduler\n", "address: required"),
        ("- local\n", "expected a mapping of option: value, got list"),
        (
            "backend: slurm\ngpus_per_job: 2\ncores: 1\n",
            "gpus_per_job=2 (a process per GPU) needs cores >= 2",
        ),
        (
            "backend: slurm\njobs: 2\nadaptive_max: 4\n",
            "set either jobs or adaptive_min/adaptive_max",
        ),
        ("backend: slurm\npartition: a\nqueue: b\n", "queue: give either partition or queue"),
        ("backend: slurm\ncores: [1\n", "invalid YAML at line 3"),
    ],
)
def test_bad_values_give_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        parse_cluster_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        parse_cluster_spec(str(tmp_path / "nope.yaml"))


def test_specs_are_frozen_and_hashable() -> None:
    spec = SlurmSpec(backend="slurm", job_script_prologue=["module load cuda"])
    with pytest.raises(pydantic.ValidationError):
        spec.cores = 8  # type: ignore[misc]
    assert hash(spec) == hash(SlurmSpec(backend="slurm", job_script_prologue=("module load cuda",)))


def test_shipped_configs_parse() -> None:
    assert parse_cluster_spec(REPO / "configs" / "cluster-local.yaml").backend == "local"
    slurm = parse_cluster_spec(REPO / "configs" / "cluster-slurm.yaml")
    assert isinstance(slurm, SlurmSpec) and slurm.gpus_per_job == 1


# --------------------------------------------------------------------------- job scripts


def test_slurm_kwargs_one_gpu_per_job() -> None:
    kw = slurm_cluster_kwargs(SlurmSpec(backend="slurm", gpus_per_job=1, jobs=2, partition="gpu"))
    assert kw["queue"] == "gpu" and kw["processes"] == 1 and kw["cores"] == 1
    assert kw["job_extra_directives"] == ["--gres=gpu:1"]
    # the default walltime (1 h) retires each worker 9 min before it: --lifetime 51 +/- 3 min
    assert kw["worker_extra_args"] == ["--resources", "GPU=1", "--lifetime", "3060s",
                                       "--lifetime-stagger", "180s"]
    assert kw["python"] == sys.executable


def test_slurm_kwargs_pin_processes_to_gpus() -> None:
    kw = slurm_cluster_kwargs(SlurmSpec(backend="slurm", gpus_per_job=4, processes=2, cores=8))
    assert kw["job_extra_directives"] == ["--gres=gpu:4"]
    assert kw["worker_extra_args"][:4] == ["--resources", "GPU=2", "--preload", "hpcpath.cluster"]
    prologue = kw["job_script_prologue"]
    assert prologue[-1] == "export HPCPATH_GPUS_PER_WORKER=2"
    # 8 cores for 2 processes: each sizes its thread pools to 4
    assert {"export OMP_NUM_THREADS=4", "export TF_NUM_INTRAOP_THREADS=4"} <= set(prologue)


@pytest.mark.parametrize(
    ("settings", "retirement"),
    [
        ({"walltime": "00:01:00"}, (37.0, 3.0)),  # margin 20 s (the minimum), stagger 5%
        ({"walltime": "2-00:00:00"}, (171900.0, 300.0)),  # margin 10 min, stagger 5 min (caps)
        ({"walltime": "90"}, (4590.0, 270.0)),  # a bare number is minutes, as for sbatch
        ({"walltime": "infinite"}, None),
        ({"walltime": "0"}, None),  # sbatch --time=0: no limit
        ({"worker_lifetime": "none"}, None),
        ({"worker_lifetime": "50m", "worker_lifetime_stagger": "2m"}, (3000.0, 120.0)),
        ({"worker_lifetime": "00:50:00"}, (3000.0, 180.0)),
        ({"worker_extra_args": ["--lifetime", "20m"]}, None),  # the user's own flags stay
    ],
)
def test_worker_lifetime_from_the_walltime(settings: dict, retirement: tuple | None) -> None:
    spec = SlurmSpec(backend="slurm", **settings)
    assert spec.worker_retirement == retirement
    args = slurm_cluster_kwargs(spec)["worker_extra_args"]
    if retirement and "worker_extra_args" not in settings:
        assert args[-4:] == ["--lifetime", f"{retirement[0]:g}s",
                             "--lifetime-stagger", f"{retirement[1]:g}s"]
    elif not retirement and "worker_extra_args" not in settings:
        assert "--lifetime" not in args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("worker_lifetime: 50\n", "worker_lifetime: '50' needs a unit ('50m', '90s') or a Slurm time"),
        ("worker_lifetime: soon\n", "worker_lifetime: 'soon' is not a duration"),
        ("walltime: '00:10:00'\nworker_lifetime: 10m\n",
         "worker_lifetime '10m' (+ stagger 30 s) must end before walltime '00:10:00'"),
        ("worker_lifetime: 1m\nworker_lifetime_stagger: 2m\n",
         "worker_lifetime_stagger (120 s) must be less than worker_lifetime (60 s)"),
        ("walltime: '0:30'\n", "walltime '0:30' leaves a worker 8 s before it must retire"),
        ("worker_lifetime: 1h\nworker_extra_args: [--lifetime, 2h]\n",
         "worker_lifetime and --lifetime in worker_extra_args: give one of them"),
    ],
)
def test_bad_worker_lifetime_is_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "backend: slurm\n" + text)
    with pytest.raises(ConfigError) as info:
        parse_cluster_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message


def test_slurm_job_script_renders_without_submitting() -> None:
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster

    spec = SlurmSpec(
        backend="slurm",
        partition="gpu",
        account="proj",
        walltime="00:10:00",
        gpus_per_job=1,
        memory="8GB",
        job_script_prologue=["module load cuda"],
        job_extra_directives=["--constraint=a100"],
    )
    with SLURMCluster(**slurm_cluster_kwargs(spec)) as cluster:
        script = cluster.job_script()
    for line in (
        "#SBATCH -p gpu",
        "#SBATCH -A proj",
        "#SBATCH -t 00:10:00",
        "#SBATCH --mem=8G",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --constraint=a100",
        "module load cuda",
        "export MALLOC_ARENA_MAX=1",
        f"{sys.executable} -m distributed.cli.dask_worker",
        "--resources GPU=1",
        "--lifetime 510s --lifetime-stagger 30s",  # retires before the 10 min walltime
    ):
        assert line in script, line


def test_dask_setup_pins_one_gpu_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("HPCPATH_GPUS_PER_WORKER", "2")
    dask_setup(SimpleNamespace(name="SLURMCluster-3-1"))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    monkeypatch.delenv("HPCPATH_GPUS_PER_WORKER")
    dask_setup(SimpleNamespace(name="SLURMCluster-3-0"))  # not a pinned job: untouched
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_slurm_without_jobqueue_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import now raises ImportError
    with (
        pytest.raises(ConfigError, match=r"pip install 'hpcpath\[slurm\]'"),
        cluster_client("slurm"),
    ):
        pass


# --------------------------------------------------------------------------- local


def square(x: int) -> int:
    return x * x


ARENAS = partial(arena_count, 6)  # malloc arenas once 6 threads allocated at once


def test_local_round_trip_and_scheduler_backend() -> None:
    import distributed  # noqa: F401 - its first import sets its logger's level; stages no longer import it

    level = logging.getLogger("distributed").level
    arena_env = os.environ.get("MALLOC_ARENA_MAX")
    with cluster_client({"backend": "local", "n_workers": 1}, n_workers_override=2) as client:
        assert client.submit(square, 7).result() == 49
        client.wait_for_workers(2, timeout=30)
        assert dashboard_link(client).startswith("http://127.0.0.1:")
        assert {w["host"] for w in client.scheduler_info()["workers"].values()} == {"127.0.0.1"}
        # every worker process starts with one malloc arena (its peak RSS flat in slide size)
        assert set(client.run(ARENAS).values()) == {1}
        assert os.environ.get("MALLOC_ARENA_MAX") == arena_env  # this process keeps its own
        # the `scheduler` backend attaches to a running scheduler
        with cluster_client(client.scheduler.address) as other:
            assert other.submit(square, 3).result() == 9
    assert logging.getLogger("distributed").level == level  # quieting is undone


async def _gather_lost_key(dask_scheduler) -> str:
    return (await dask_scheduler.gather(keys=["hpcpath-lost-key"]))["status"]


def test_gather_of_a_lost_result_stays_off_the_terminal(caplog: pytest.LogCaptureFixture) -> None:
    # A gather that races a retiring worker (walltime lifetimes) makes the real scheduler log
    # "Couldn't gather keys" at ERROR; the client recomputes and gathers again, so the user's
    # terminal must not show it.  The same scheduler call on a key no worker holds:
    with cluster_client({"backend": "local", "n_workers": 1}) as client:
        assert client.run_on_scheduler(_gather_lost_key) == "error"
    # (Dask's stderr handler was bound at import to pytest's stream; the records show it all.)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("distributed")]
    assert not [m for m in said if "Couldn't gather" in m], said


def test_unreachable_scheduler_is_a_cluster_error() -> None:
    spec = {"backend": "scheduler", "address": "tcp://127.0.0.1:9", "worker_timeout": 1}
    expected = r"cannot connect to the scheduler tcp://127\.0\.0\.1:9"
    with pytest.raises(ClusterError, match=expected), cluster_client(spec):
        pass


# --------------------------------------------------------------------------- real Slurm


# Slurm workers cannot import this test module, so what they run must come from elsewhere.
GPU_ENV = partial(os.getenv, "CUDA_VISIBLE_DEVICES")


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def assert_jobs_gone(ids: set[str], within: float = 15) -> None:
    deadline = time.monotonic() + within
    while ids & squeue_ids():
        assert time.monotonic() < deadline, f"Slurm jobs left behind: {sorted(ids & squeue_ids())}"
        time.sleep(0.25)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_one_gpu_per_job(local_slurm: dict[str, str], tmp_path: Path) -> None:
    spec = {
        "backend": "slurm",
        "gpus_per_job": 1,
        "jobs": 2,
        "memory": "1GB",
        "walltime": "00:05:00",
        "log_directory": str(tmp_path),
        "worker_timeout": 60,
    }
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=60)
        devices = client.run(GPU_ENV)
        assert len(devices) == 2 and set(devices.values()) == {"0", "1"}
        assert set(client.run(ARENAS).values()) == {1}  # the job script's env
        futures = [client.submit(GPU_ENV, resources={"GPU": 1}, pure=False) for _ in range(6)]
        results = client.gather(futures)
        assert set(results) <= {"0", "1"} and len(results) == 6
        ids = {str(job.job_id) for job in client.cluster.workers.values()}
        assert len(ids) == 2 and ids <= squeue_ids()
        assert dashboard_link(client).startswith("http://127.0.0.1:")  # where it listens
    assert_jobs_gone(ids)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_pins_each_process_of_a_two_gpu_job(
    local_slurm: dict[str, str], tmp_path: Path
) -> None:
    spec = {
        "backend": "slurm",
        "gpus_per_job": 2,
        "memory": "1GB",
        "walltime": "00:05:00",
        "log_directory": str(tmp_path),
        "worker_timeout": 60,
        # the --preload needs hpcpath importable in the job, installed or not
        "job_script_prologue": [f"export PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    with cluster_client(spec) as client:
        client.wait_for_workers(2, timeout=60)
        assert sorted(client.run(GPU_ENV).values()) == ["0", "1"]
        ids = {str(job.job_id) for job in client.cluster.workers.values()}
    assert len(ids) == 1
    assert_jobs_gone(ids)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_slurm_pending_jobs_give_a_clear_timeout(
    local_slurm: dict[str, str], tmp_path: Path
) -> None:
    blocker = (
        subprocess.run(
            ["sbatch", "--parsable", "--gres=gpu:2", "-o", "/dev/null", "--wrap", "sleep 120"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    try:
        spec = {
            "backend": "slurm",
            "gpus_per_job": 1,
            "memory": "1GB",
            "walltime": "00:05:00",
            "log_directory": str(tmp_path),
            "worker_timeout": 3,
        }
        expected = r"no Dask worker connected within \d+ s: Slurm job\(s\) \d+ PENDING"
        with pytest.raises(ClusterError, match=expected), cluster_client(spec):
            pass
    finally:
        subprocess.run(["scancel", blocker], check=False)
    assert_jobs_gone({blocker})


@pytest.mark.slurm
def test_slurm_rejected_job_fails_fast(local_slurm: dict[str, str]) -> None:
    spec = {"backend": "slurm", "partition": "no-such-partition"}
    expected = r"Slurm rejects the worker job: .*invalid partition"
    with pytest.raises(ClusterError, match=expected), cluster_client(spec):
        pass


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path) -> None:
    from hpcpath.config import DatasetConfig, TrainConfig

    kind = path.name.split("-", 1)[0]
    load = {"cluster": parse_cluster_spec, "dataset": DatasetConfig.load, "train": TrainConfig.load}[kind]
    load(path)

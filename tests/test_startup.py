"""Start-up and scaling (issue 12): ``--cluster auto`` runs one slide in this process with no
Dask imported, the in-process backend really runs units side by side, and LocalCluster
workers are pinned to disjoint cores.  Real slide, real LocalCluster, real threads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

from hpcpath.backends import Unit
from hpcpath.backends.auto import AutoBackend
from hpcpath.backends.inline import InlineBackend
from hpcpath.cluster.pinning import core_sets

HEAVY = ("distributed", "bokeh", "tensorflow", "keras", "pyspark", "dask_jobqueue")

# the CLI in a fresh interpreter; afterwards, which heavy packages the process imported
CLI_THEN_MODULES = (
    "import sys\n"
    "from hpcpath.cli.main import cli\n"
    "try:\n"
    "    cli.main(args=sys.argv[1:], prog_name='hpcpath', standalone_mode=False)\n"
    "finally:\n"
    f"    print('MODULES', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))\n"
)


def _tile(args, env=None):
    return subprocess.run([sys.executable, "-c", CLI_THEN_MODULES, "tile", *map(str, args)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _arrays(store):
    g = zarr.open_group(str(store), mode="r")
    out = {}

    def walk(node, prefix=""):
        for name, child in node.members():
            if isinstance(child, zarr.Array):
                out[prefix + name] = np.asarray(child[...])
            else:
                walk(child, prefix + name + "/")

    walk(g)
    return out


def test_auto_tiles_one_slide_in_process_and_a_cohort_on_a_local_cluster(tmp_path, test_data):
    """One slide: no cluster, no Dask import, one line saying so; two slides: a LocalCluster
    with its dashboard.  The stores are the same array for array."""
    slide = test_data / "slides" / "cmu-1-small-region.svs"
    env = {"HPCPATH_CLUSTER": ""}
    one = _tile([slide, "-o", tmp_path / "one"], env)
    assert one.returncode == 0, one.stderr
    assert "MODULES []" in one.stdout, one.stdout  # nothing of Dask, Bokeh, TensorFlow, Spark
    assert "hpcpath: 1 slide: running in this process on" in one.stderr
    assert "no dashboard" in one.stderr and "dashboard http" not in one.stderr

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("a.svs", "b.svs"):
        shutil.copyfile(slide, cohort / name)  # two slides (a symlinked pair is one slide)
    two = _tile([cohort, "-o", tmp_path / "two"], env)
    assert two.returncode == 0, two.stderr
    assert "hpcpath: 2 slides: starting a local Dask cluster" in two.stderr
    assert "dashboard http://127.0.0.1:" in two.stderr and "distributed" in two.stdout

    inline = _arrays(tmp_path / "one" / "cmu-1-small-region.zarr")
    assert len(inline["tiles/images"]) == 33 and "image/0" in inline and "tissue/mask" in inline
    for sid in ("a", "b"):
        clustered = _arrays(tmp_path / "two" / f"{sid}.zarr")
        assert clustered.keys() == inline.keys()
        for key, value in inline.items():
            assert np.array_equal(clustered[key], value), key


def _wait_both(barrier):
    barrier.wait(timeout=10)  # BrokenBarrierError unless another unit runs at the same time
    return 1


def _fail():
    raise ValueError("broken unit")


def test_inline_threads_run_independent_units_at_once_and_keep_dependencies():
    barrier = threading.Barrier(2)
    seen, calls = {}, []

    def expand(sid, plan):
        if sid == "bad":
            return [Unit(_fail, (), "x", ("bad",)), Unit(calls.append, ("never",), "y", ("y",), after=(0,))]
        return [Unit(_wait_both, (barrier,), "x", ("a",)), Unit(_wait_both, (barrier,), "x", ("b",)),
                Unit(lambda a, b: a + b + 5, (), "y", ("sum",), after=(0, 1))]

    def finish(sid, out):
        seen[sid] = (out.sums, out.error)

    InlineBackend(threads=2).run({"s": (dict, ()), "bad": (dict, ())}, expand, finish, stage="t")
    assert seen["s"] == ({"x": 2, "y": 7}, None)  # the two units met at the barrier
    assert seen["bad"] == ({}, "ValueError: broken unit") and calls == []  # its dependant never ran


def test_auto_backend_starts_a_cluster_only_for_more_than_one_slide():
    started, lines = [], []

    class FakeCluster:
        def run(self, plans, expand, finish, **kw):
            started.append(len(plans))

    auto = AutoBackend(lambda: FakeCluster(), say=lines.append)
    assert auto.expect(0) is auto.inline and lines == []  # nothing to do: nothing said
    assert auto.expect(1) is auto.inline and lines[0].startswith("1 slide: running in this process")
    auto.run({"a": (dict, ()), "b": (dict, ())}, lambda s, p: [], lambda s, o: None, stage="t")
    assert started == [2] and lines[1] == "2 slides: starting a local Dask cluster (--cluster auto)"
    auto.run({"c": (dict, ())}, lambda s, p: [], lambda s, o: None, stage="t")
    assert started == [2, 1]  # once started, the cluster serves every later run


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two cores")
def test_local_workers_are_pinned_to_disjoint_cores():
    from hpcpath.cluster import cluster_client

    def affinity():
        return [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")], \
            os.environ.get("OMP_NUM_THREADS")

    cores = sorted(os.sched_getaffinity(0))
    with cluster_client({"backend": "local", "n_workers": 2}) as client:
        got = list(client.run(affinity).values())
    masks = [set(map(tuple, threads)) for threads, _ in got]
    assert all(len(m) == 1 for m in masks), masks  # every thread of a worker has its mask
    sets = [set(next(iter(m))) for m in masks]
    assert not sets[0] & sets[1] and sets[0] | sets[1] == set(cores)
    assert sorted(map(sorted, sets)) == core_sets(cores, 2)
    assert {omp for _, omp in got} == {str(len(cores) // 2)}  # BLAS sized to the worker's cores


def test_pinning_keeps_the_worker_preloads_the_dask_config_names():
    """LocalCluster's ``preload`` argument replaces ``distributed.worker.preload``: the
    pinning preload is added to the configured ones, never instead of them."""
    import dask

    from hpcpath.cluster.local import worker_pinning
    from hpcpath.cluster.spec import parse_cluster_spec

    spec = parse_cluster_spec({"backend": "local"})
    if not worker_pinning(spec, 2):
        pytest.skip("no CPU affinity here")
    with dask.config.set({"distributed.worker.preload": ["/site/preload.py"]}):
        assert worker_pinning(spec, 2)["preload"] == ["/site/preload.py", "hpcpath.cluster.pinning"]
    with dask.config.set({"distributed.worker.preload": "/site/one.py"}):
        assert worker_pinning(spec, 2)["preload"] == ["/site/one.py", "hpcpath.cluster.pinning"]

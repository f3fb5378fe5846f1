"""The Spark backend: plans and units as Spark tasks, one partition each.

A slide's work is a plan, then units (a run of whole tile chunks, a pyramid band, a block
of prediction rows).  With at least as many slides as task slots, a Spark task owns a whole
slide: one task plans it, one runs its units one after another in dependency order, and
each slide is a driver thread submitting its own two jobs, so slides overlap as on Dask
(launching a Spark task costs ~0.1 s, more than many units take).  With fewer slides the
stage runs as a few jobs over all slides: the plans, then the units phase by phase, each
Spark task a run of whole units (about two tasks per task slot).  Each task writes its own
Zarr chunks through the same unit functions the Dask backend runs and returns a small
record (an int, a plan dict), never pixels: nothing goes through ``collect()`` but those
records.  Unit functions are idempotent and completion markers are written last, so
Spark's task retries (a lost executor, a killed Python worker) and speculative copies
rewrite the same bytes.

A unit's exception is caught in its task and comes back as a one-line error for its slide
(the others go on); only a crash (a killed worker, a segfault) fails the Spark task, which
Spark retries (``spark.task.maxFailures``; ``local[N]`` becomes ``local[N,4]`` for the same
reason).  A job that still fails is rerun a partition per job, so the failure lands on the
one slide that caused it.

GPUs: with ``executor_gpus`` in the spec every task is given one GPU address by Spark's
resource scheduler (``spark.task.resource.gpu.amount=1``); a ``gpu`` unit hands its address
to :func:`hpcpath.gpu.set_task_gpu`, so TensorFlow runs it on that device only.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcpath.backends.base import Outcome, SlideLoop, Unit, one_line, phases
from hpcpath.backends.inline import call_unit
from hpcpath.errors import ClusterError, ConfigError

if TYPE_CHECKING:
    from hpcpath.cluster.spec import SparkSpec

__all__ = ["SparkBackend", "spark_backend", "spark_conf", "task_gpu_address"]

TASKS_PER_SLOT = 2
_LOCAL = re.compile(r"^local(\[(\*|\d+)(,\s*(\d+))?\])?$")
_LOG4J = """status = error
rootLogger.level = {level}
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = spark: %p %c{{1}}: %m%n%ex
"""


def task_gpu_address() -> str | None:
    """The GPU address(es) Spark gave the running task (``TaskContext.resources()["gpu"]``),
    comma-separated (one with ``spark.task.resource.gpu.amount=1``), or None."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    if ctx is None:
        return None
    gpu = ctx.resources().get("gpu")
    return ",".join(gpu.addresses) if gpu is not None and gpu.addresses else None


def _execute(item: tuple) -> tuple[str, Any]:
    """In a Spark task: one plan or unit; ``("ok", result)`` or ``("error", one line)``.

    The task runs in the driver's working folder where this node has it (a shared file
    system, as for Dask workers), so relative slide and output paths mean the same there."""
    fn, args, retries, gpu, cwd = item
    from hpcpath.gpu import set_task_gpu

    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)

    set_task_gpu(task_gpu_address() if gpu else None)
    try:
        return "ok", call_unit(fn, args, retries)
    except Exception as exc:  # noqa: BLE001 - the slide fails, not the Spark job
        return "error", one_line(exc)
    finally:
        set_task_gpu(None)


def _execute_all(items) -> Iterator[tuple[str, Any]]:
    """In a Spark task: its partition's plans or units, one after another."""
    for item in items:
        yield _execute(item)


def _execute_slides(items) -> Iterator[list[tuple[str, Any]]]:
    """In a Spark task: whole slides, each its units in list order (a unit waits only for
    earlier ones), each unit given its dependencies' results, as the Dask backend would;
    a unit whose dependency failed fails with it, unrun.  One record per unit."""
    for units, cwd in items:
        recs: list[tuple[str, Any]] = []
        for fn, args, after, retries, gpu in units:
            bad = [recs[a] for a in after if recs[a][0] != "ok"]
            recs.append(bad[0] if bad else _execute((fn, (*args, *(recs[a][1] for a in after)), retries, gpu, cwd)))
        yield recs


def _warm(_: int) -> int:
    """In a Spark task: import the heavy libraries every unit needs (the stores, the slide
    readers), so the first stage does not pay for it."""
    import hpcpath.io  # noqa: F401
    import hpcpath.store  # noqa: F401

    return os.getpid()


def _on_slot(item: tuple[Callable[..., Any], tuple]) -> Any:
    """In a Spark task: ``fn(*args)`` with the task's GPU address set (see on_each_slot)."""
    from hpcpath.gpu import set_task_gpu

    fn, args = item
    set_task_gpu(task_gpu_address())
    try:
        return fn(*args)
    finally:
        set_task_gpu(None)


class SparkBackend:
    """Runs stages on a ``pyspark.SparkContext`` (or the context of a ``SparkSession``)."""

    name = "spark"

    def __init__(self, spark) -> None:
        self.sc = getattr(spark, "sparkContext", spark)

    # ------------------------------------------------------------------ jobs
    def _alive(self) -> bool:
        try:
            return not self.sc._jsc.sc().isStopped()
        except Exception:  # noqa: BLE001 - the gateway itself is gone
            return False

    def _lost(self, exc: BaseException) -> ClusterError:
        return ClusterError(f"lost the Spark driver or cluster {self.sc.master} mid-run "
                            f"({one_line(exc)}): nothing more was marked complete; rerun the "
                            "same command to resume")

    def _job(self, description: str, items: list[tuple], per_item: bool = False,
             fn: Callable[[Any], Iterator[Any]] = _execute_all) -> list[Any]:
        """The items as one Spark job; their records, in order.  Each task runs a run of whole
        items (at most ``TASKS_PER_SLOT`` tasks per task slot: a Spark task costs ~0.1 s to
        launch, more than a pyramid band or a run of passthrough chunks takes), or one item
        with ``per_item``; ``fn`` runs a partition's items (default: plans or units)."""
        if not items:
            return []
        self.sc.setJobDescription(description)
        n = len(items) if per_item else min(len(items), max(1, self._slots() * TASKS_PER_SLOT))
        try:
            return self.sc.parallelize(items, n).mapPartitions(fn).collect()
        except Exception as exc:  # noqa: BLE001 - a task failed past its retries
            if not self._alive():
                raise self._lost(exc) from None
            if len(items) == 1:
                return [("error", f"Spark task failed past its retries: {_spark_reason(exc)}")]
        return [self._job(description, [it], per_item=True, fn=fn)[0] for it in items]  # find the culprit

    def run(self, plans: dict[str, tuple[Callable, tuple]],
            expand: Callable[[str, dict], list[Unit]],
            finish: Callable[[str, Outcome], None], *,
            stage: str, key: str = "", label: str = "",
            on_task: Callable[[str, str, int], None] | None = None) -> None:
        loop = SlideLoop(plans, expand, finish, on_task)
        if len(plans) >= self._slots():
            self._run_slides(stage, label, plans, loop)
            return
        sids = list(plans)
        records = self._job(f"hpcpath {stage}: plan {len(sids)} slide(s) -> {label}",
                            [(fn, args, 0, False, os.getcwd()) for fn, args in plans.values()])
        units: dict[str, list[Unit]] = {}
        for sid, (status, value) in zip(sids, records):
            if status == "ok":
                units[sid] = loop.planned(sid, value)
            else:
                loop.planned(sid, error=value)
        phase = {sid: phases(us) for sid, us in units.items()}
        results: dict[tuple[str, int], tuple[str, Any]] = {}
        top = max((max(p, default=-1) for p in phase.values()), default=-1)
        for p in range(top + 1):
            todo: list[tuple[str, int]] = []
            for sid, us in units.items():
                for i, u in enumerate(us):
                    if phase[sid][i] != p:
                        continue
                    failed = [a for a in u.after if results[(sid, a)][0] != "ok"]
                    if failed:
                        results[(sid, i)] = results[(sid, failed[0])]
                        loop.unit_done(sid, u, error=results[(sid, i)][1])
                    else:
                        todo.append((sid, i))
            items = []
            for sid, i in todo:
                u = units[sid][i]
                deps = tuple(results[(sid, a)][1] for a in u.after)
                items.append((u.fn, (*u.args, *deps), u.retries, u.gpu, os.getcwd()))
            kinds = sorted({units[s][i].kind for s, i in todo})
            for (sid, i), rec in zip(todo, self._job(
                    f"hpcpath {stage}: {'+'.join(kinds)} ({len(todo)} tasks) -> {label}", items)):
                results[(sid, i)] = rec
                status, value = rec
                loop.unit_done(sid, units[sid][i], value if status == "ok" else None,
                               None if status == "ok" else value)

    def _run_slides(self, stage: str, label: str, plans: dict[str, tuple[Callable, tuple]], loop: SlideLoop) -> None:
        """A Spark task per slide for its plan, then one for its whole unit chain, each slide
        in a driver thread of its own (``2 x`` task slots at once), so a slide's units start
        as soon as its plan is in, while other slides plan: no stage-wide barrier.  A retried
        task reruns the whole chain: its units rewrite the same chunks."""
        lock = threading.Lock()  # the loop's callbacks (manifest, progress) run one at a time
        cwd = os.getcwd()

        def one(sid: str) -> None:
            fn, args = plans[sid]
            [(status, value)] = self._job(f"hpcpath {stage}: plan {sid} -> {label}",
                                          [(fn, args, 0, False, cwd)], per_item=True)
            with lock:
                units = loop.planned(sid, value) if status == "ok" else loop.planned(sid, error=value)
            if not units:
                return
            phases(units)  # checks that units wait only for earlier ones
            kinds = "+".join(sorted({u.kind for u in units}))
            [recs] = self._job(f"hpcpath {stage}: {kinds} of {sid} ({len(units)} units) -> {label}",
                               [([(u.fn, u.args, u.after, u.retries, u.gpu) for u in units], cwd)],
                               per_item=True, fn=_execute_slides)
            if recs[0] == "error":  # the task failed past Spark's retries: the whole slide
                recs = [recs] * len(units)
            with lock:
                for u, (st, val) in zip(units, recs):
                    loop.unit_done(sid, u, val if st == "ok" else None, None if st == "ok" else val)

        pool = ThreadPoolExecutor(max_workers=min(len(plans), 2 * max(1, self._slots())))
        try:
            for f in [pool.submit(one, sid) for sid in plans]:
                f.result()  # a lost driver or cluster: its one line
        except BaseException:  # Ctrl-C, a lost cluster: start no more slides and do not wait
            pool.shutdown(wait=False, cancel_futures=True)  # for running jobs (stopping the
            raise  # session ends them)
        pool.shutdown(wait=True)

    # ------------------------------------------------------------------ workers
    def _slots(self) -> int:
        return int(self.sc.defaultParallelism)

    def warm_up(self) -> None:
        """Start a Python worker per task slot and import the stage modules there (what a
        Dask worker does when it starts), so start-up is paid before the first stage."""
        n = max(1, self._slots())
        self.sc.setJobDescription("hpcpath: start Python workers")
        self.sc.parallelize(range(n), n).map(_warm).collect()

    def offers_gpus(self) -> bool:
        return float(self.sc.getConf().get("spark.task.resource.gpu.amount", "0") or 0) > 0

    def on_each_slot(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(*args)`` in as many tasks as there are task slots (each with its GPU address)."""
        n = max(1, self._slots())
        self.sc.setJobDescription(f"hpcpath: {getattr(fn, '__name__', 'call')} on each slot")
        return self.sc.parallelize([(fn, args)] * n, n).map(_on_slot).collect()

    def executors(self) -> int:
        """Executors registered (local mode: the driver's own, 1)."""
        if self.sc.master.startswith("local"):
            return 1
        return max(0, int(self.sc._jsc.sc().getExecutorMemoryStatus().size()) - 1)

    def wait_for_workers(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.executors() < n and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.executors()


def _spark_reason(exc: BaseException) -> str:
    """The first useful line of a Spark job failure (Py4J wraps it in pages of Java)."""
    text = str(exc)
    m = re.search(r"(Lost task [^\n]*?\): )?([A-Za-z.]*(Exception|Error)[^\n]*)", text)
    line = (m.group(2) if m else text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return line[:300]


def spark_conf(spec: SparkSpec, n_workers: int | None = None, log_dir: str | None = None) -> tuple[str, dict[str, str]]:
    """The master URL and Spark settings for ``spec`` (pure: tested without Spark).

    >>> from hpcpath.cluster.spec import SparkSpec
    >>> m, c = spark_conf(SparkSpec(backend="spark", master="local[2]"))
    >>> m, c["spark.task.maxFailures"], "spark.executor.resource.gpu.amount" in c
    ('local[2,4]', '4', False)
    >>> m, c = spark_conf(SparkSpec(backend="spark", master="spark://h:7077", executor_gpus=2,
    ...                             gpu_discovery_script="/bin/true"))
    >>> c["spark.task.resource.gpu.amount"], c["spark.executor.resource.gpu.amount"]
    ('1', '2')
    """
    master = spec.master
    m = _LOCAL.match(master)
    if m:
        n = n_workers or (None if m.group(2) in (None, "*") else int(m.group(2))) or os.cpu_count() or 1
        master = f"local[{n},{m.group(4) or 4}]"
    conf = {
        "spark.app.name": spec.app_name,
        "spark.ui.showConsoleProgress": "false",
        "spark.pyspark.python": spec.python or sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.python.worker.reuse": "true",
        "spark.task.maxFailures": "4",
        "spark.executorEnv.TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if spec.executor_cores:
        conf["spark.executor.cores"] = str(spec.executor_cores)
    if n_workers and not m:
        conf["spark.cores.max"] = str(n_workers * (spec.executor_cores or 1))
    if spec.executor_memory:
        conf["spark.executor.memory"] = spec.executor_memory
    if spec.driver_memory:
        conf["spark.driver.memory"] = spec.driver_memory
    if spec.executor_gpus:
        conf["spark.executor.resource.gpu.amount"] = str(spec.executor_gpus)
        conf["spark.task.resource.gpu.amount"] = "1"
        if spec.gpu_discovery_script:
            conf["spark.executor.resource.gpu.discoveryScript"] = spec.gpu_discovery_script
    conf.update({k: str(v) for k, v in spec.conf.items()})
    return master, conf


@contextmanager
def _stderr_to(path: Path | None) -> Iterator[None]:
    """File descriptor 2 sent to ``path`` meanwhile: a JVM started now keeps it for good."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


@contextmanager
def spark_backend(spec: SparkSpec, n_workers: int | None = None, *, log_file: str | os.PathLike | None = None,
                  verbose: bool = False) -> Iterator[SparkBackend]:
    """A SparkSession for ``spec`` (local, standalone ``spark://``, ``yarn``...), stopped on exit.

    The driver JVM's output (and, in local mode, its Python workers') goes to ``log_file``
    (default: a file deleted at the end; ``verbose``: the terminal), its console progress bar
    is off and its logging at warnings, so a run prints hpcpath's lines only.  Waits up to
    ``spec.worker_timeout`` seconds for a first executor."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("--cluster spark: pyspark is not installed; pip install "
                          "'hpcpath[spark]' (or pip install pyspark)") from None
    master, conf = spark_conf(spec, n_workers)
    if spec.python or not os.environ.get("PYSPARK_PYTHON"):  # what PySpark sends executors
        os.environ["PYSPARK_PYTHON"] = conf["spark.pyspark.python"]
    with tempfile.TemporaryDirectory(prefix="hpcpath-spark-") as tmp:
        log4j = Path(tmp) / "log4j2.properties"
        log4j.write_text(_LOG4J.format(level="warn"))
        opt = f"-Dlog4j2.configurationFile=file:{log4j}"
        for k in ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions"):
            conf[k] = f"{conf[k]} {opt}" if k in conf else opt
        builder = SparkSession.builder.master(master)
        for k, v in conf.items():
            builder = builder.config(k, v)
        log = None if verbose else Path(log_file) if log_file else Path(tmp) / "spark.log"
        try:
            with _stderr_to(log):
                session = builder.getOrCreate()
        except Exception as exc:  # noqa: BLE001 - no Java, a bad master URL, ...
            why = _spark_reason(exc)
            if "Java gateway process exited" in why:
                why = f"the Spark driver (Java) did not start; is a JDK 17 installed? See {log}"
            raise ClusterError(f"cannot start Spark on {master}: {why}") from None
        try:
            session.sparkContext.setLogLevel("WARN")
            backend = SparkBackend(session)
            if backend.wait_for_workers(1, spec.worker_timeout) < 1:
                raise ClusterError(f"no Spark executor registered with {master} within "
                                   f"{spec.worker_timeout:.0f} s: are its workers up, with free "
                                   "cores and memory (and GPUs, with executor_gpus)?")
            backend.warm_up()
            yield backend
        finally:
            session.stop()

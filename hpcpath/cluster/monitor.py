"""What a user sees of a run while it goes: hpcpath's page on the Dask dashboard, task names
that read as hpcpath's work, the printed links (with the ssh tunnel a cluster needs), and
worker output kept out of the terminal.

- :func:`task_key` names every task ``<stage>-<slide>/<part>...`` so that Dask's task stream
  and progress bars group by stage (``tile``, ``pyramid``, ``predict``...) and a task's
  hover names its slide.
- :class:`RunProgress` is fed by the per-slide driver loop and publishes small counts to the
  scheduler's metadata (never pixels, at most a few times a second).
- :func:`install_dashboard_page` adds ``/hpcpath`` (HTML) and ``/hpcpath/runs.json`` to the
  scheduler's web server: slides done / failed / remaining per run, from that metadata.
- :func:`dashboard_lines` gives the lines the CLI prints: the link, hpcpath's page and, where
  the scheduler is on a cluster node, the ``ssh -L`` command that reaches it.
- :class:`WorkerLog` sends worker processes' stdout/stderr (TensorFlow's start-up banners,
  tracebacks) to ``<run folder>/hpcpath-logs/`` instead of the user's terminal.
"""

from __future__ import annotations

import html
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from distributed.diagnostics.plugin import WorkerPlugin

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "RunProgress",
    "WorkerLog",
    "dashboard_lines",
    "install_dashboard_page",
    "task_key",
    "tunnel_command",
]

logger = logging.getLogger(__name__)

METADATA_KEY = "hpcpath-runs"
PAGE = "/hpcpath"
LOG_FOLDER = "hpcpath-logs"  # inside a run's output folder
_KEEP_FAILED = 50  # failures shown per run; the manifest has them all


def task_key(stage: str, slide_id: str, *parts: object) -> str:
    """A Dask key ``<stage>-<slide>/<part>/...`` whose Dask prefix is ``stage``.

    Dask groups keys by their leading alphabetic words (``key_split``), so the slide id has
    its ``-`` replaced and always carries a ``/`` part: an alphabetic slide id such as
    ``tumor`` must not join the prefix.

    >>> task_key("tile", "TCGA-A1-01", 0, "r1")
    'tile-TCGA_A1_01/0/r1'
    >>> from dask.utils import key_split
    >>> key_split(task_key("predict", "tumor")), key_split(task_key("pyramid-base", "x", 3))
    ('predict', 'pyramid-base')
    """
    tail = "/".join(str(p) for p in parts)
    return f"{stage}-{slide_id.replace('-', '_')}/{tail}"


class RunProgress:
    """Slides done / failed / remaining of one stage run, published to the scheduler.

    Publishing is best effort: a scheduler that cannot store metadata never fails a run.
    """

    def __init__(self, client: Client | None, stage: str, run: str, total: int,
                 *, label: str = "", interval: float = 0.5) -> None:
        self.client = client
        self.interval = interval
        self.state: dict[str, Any] = {
            "stage": stage, "run": run, "label": label, "total": int(total), "done": 0, "failed": 0,
            "started": time.time(), "updated": time.time(), "finished": None,
            "failures": [], "recent": [],
        }
        self._last = 0.0
        self._publish(force=True)

    def slide(self, slide_id: str, error: str | None = None) -> None:
        st = self.state
        if error:
            st["failed"] += 1
            if len(st["failures"]) < _KEEP_FAILED:
                st["failures"].append([slide_id, error])
        else:
            st["done"] += 1
            st["recent"] = ([slide_id] + st["recent"])[:10]
        self._publish()

    def close(self) -> None:
        self.state["finished"] = time.time()
        self._publish(force=True)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.client is None or (not force and now - self._last < self.interval):
            return
        self._last = now
        self.state["updated"] = time.time()
        try:
            self.client.set_metadata([METADATA_KEY, f"{self.state['stage']}:{self.state['run']}"],
                                     dict(self.state))
        except Exception as exc:  # noqa: BLE001 - monitoring never fails a run
            logger.debug("cannot publish progress: %s", exc)
            self.client = None


# -- the scheduler's page --------------------------------------------------------------------

def install_dashboard_page(client: Client) -> bool:
    """Serve ``/hpcpath`` from the scheduler's web server; False where that cannot be done
    (a scheduler without hpcpath installed, or without a dashboard)."""
    try:
        return bool(client.run_on_scheduler(_add_routes))
    except Exception as exc:  # noqa: BLE001
        logger.debug("cannot add the hpcpath page to the dashboard: %s", exc)
        return False


def _add_routes(dask_scheduler: Any = None) -> bool:
    """Runs on the scheduler: add hpcpath's handlers once."""
    from tornado.web import RequestHandler

    app = getattr(dask_scheduler, "http_application", None)
    if app is None:
        return False
    if getattr(dask_scheduler, "_hpcpath_page", False):
        return True

    scheduler = dask_scheduler

    class _Runs(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.write(json.dumps(_runs(scheduler)))

    class _Page(RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.write(render_page(_runs(scheduler)))

    app.add_handlers(r".*", [(rf"{PAGE}/?", _Page), (rf"{PAGE}/runs\.json", _Runs)])
    dask_scheduler._hpcpath_page = True
    return True


def _runs(scheduler: Any) -> list[dict[str, Any]]:
    runs = scheduler.get_metadata([METADATA_KEY], default={}) or {}
    return sorted(runs.values(), key=lambda r: r.get("started", 0), reverse=True)


def render_page(runs: Sequence[Mapping[str, Any]]) -> str:
    """hpcpath's dashboard page (pure: runs in, self-contained HTML out)."""
    now = time.time()
    rows = []
    for r in runs:
        total, done, failed = r["total"], r["done"], r["failed"]
        left = max(total - done - failed, 0)
        ended = r.get("finished")
        secs = (ended or now) - r["started"]
        pct = (lambda n, total=total: 100.0 * n / total if total else 0.0)
        bar = (f'<div class="bar"><span class="done" style="width:{pct(done):.1f}%"></span>'
               f'<span class="failed" style="width:{pct(failed):.1f}%"></span></div>')
        status = state = "finished" if ended else "running"
        if not ended and done + failed and left:  # slides so far say how long the rest takes
            state += f" &middot; about {secs / (done + failed) * left:,.0f} s left"
        label = html.escape(str(r.get("label") or r["run"]))
        fails = "".join(
            f"<li><b>{html.escape(str(s))}</b>: {html.escape(str(e))}</li>" for s, e in r["failures"]
        )
        rows.append(
            f'<section class="run {status}"><h2>{html.escape(r["stage"])} '
            f'<small>{label} &middot; {secs:,.0f} s &middot; {state}</small></h2>'
            f'{bar}<p class="counts"><span class="n-done">{done} done</span> &middot; '
            f'<span class="n-failed">{failed} failed</span> &middot; '
            f'<span class="n-left">{left} remaining</span> of {total} slides</p>'
            + (f'<ul class="failures">{fails}</ul>' if fails else "")
            + "</section>"
        )
    body = "".join(rows) or "<p>No hpcpath run has reported yet.</p>"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
        "<title>hpcpath runs</title><style>"
        "body{font-family:sans-serif;margin:1.5em;color:#222}"
        "h1 a{font-size:60%;margin-left:1em}"
        ".run{border:1px solid #ccc;border-radius:6px;padding:.4em 1em;margin:.8em 0}"
        ".bar{height:22px;background:#eee;border-radius:4px;overflow:hidden;display:flex}"
        ".bar .done{background:#2e7d32}.bar .failed{background:#c62828}"
        "small{color:#666;font-weight:normal}.failures{color:#c62828}"
        "</style></head><body>"
        "<h1>hpcpath runs <a href='status'>Dask status</a></h1>"
        f"{body}</body></html>"
    )


# -- links and the tunnel --------------------------------------------------------------------

_LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def tunnel_command(host: str, port: int, *, node: str, login: str | None,
                   local_port: int = 8787) -> str:
    """The ``ssh`` command that brings a dashboard at ``host:port`` on ``node`` to a laptop.

    A dashboard on the node's own address is reached through the login host; one bound to
    the node's loopback only through a jump to the node itself.

    >>> tunnel_command("10.1.0.7", 8787, node="n1", login="login01")
    'ssh -N -L 8787:n1:8787 login01'
    >>> tunnel_command("127.0.0.1", 40111, node="n1", login="login01")
    'ssh -N -L 8787:127.0.0.1:40111 -J login01 n1'
    >>> tunnel_command("127.0.0.1", 40111, node="login01", login=None)
    'ssh -N -L 8787:127.0.0.1:40111 login01'
    """
    if host.startswith(_LOOPBACK):
        jump = f" -J {login}" if login and login != node else ""
        return f"ssh -N -L {local_port}:127.0.0.1:{port}{jump} {node}"
    return f"ssh -N -L {local_port}:{node}:{port} {login or node}"


def _this_node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def _is_local_address(host: str) -> bool:
    if host.startswith(_LOOPBACK) or host in ("", "0.0.0.0", "::"):
        return True
    try:
        import psutil

        return any(a.address == host for addrs in psutil.net_if_addrs().values() for a in addrs)
    except Exception:  # noqa: BLE001
        return False


def dashboard_lines(link: str, *, on_cluster: bool = False,
                    env: Mapping[str, str] | None = None) -> list[str]:
    """The lines ``hpcpath`` prints about the dashboard at ``link`` (empty: no dashboard).

    A tunnel command is added where the user is likely elsewhere: inside a Slurm job, with a
    Slurm backend (``on_cluster``), or in an ssh session.  A ``link`` from distributed's
    ``dashboard.link`` template that has no host (JupyterHub's ``/user/.../proxy/PORT/status``)
    is printed as it is: jupyter-server-proxy already reaches it.
    """
    env = os.environ if env is None else env
    if not link:
        return []
    parts = urlsplit(link)
    page = link.rsplit("/status", 1)[0] + PAGE if link.endswith("/status") else ""
    lines = [f"dashboard {link}" + (f"  (hpcpath progress: {page})" if page else "")]
    in_job = bool(env.get("SLURM_JOB_ID"))
    if parts.hostname and parts.port and (in_job or on_cluster or env.get("SSH_CONNECTION")):
        host = parts.hostname
        node = _this_node() if _is_local_address(host) else host
        login = env.get("SLURM_SUBMIT_HOST") if in_job else None
        if login:
            login = login.split(".")[0]
        cmd = tunnel_command(host, parts.port, node=node, login=login)
        lines.append(f"dashboard from your machine: {cmd}  then open "
                     f"http://localhost:8787{parts.path or '/status'}")
    return lines


# -- quiet workers ---------------------------------------------------------------------------

class WorkerLog(WorkerPlugin):
    """A worker plugin: the worker process's stdout and stderr go to
    ``<folder>/worker-<host>-<pid>.log``.

    TensorFlow and other native libraries print start-up banners straight to file
    descriptor 2, so the descriptors themselves are redirected.  Never applied to a worker
    living in the client's own process (a threads-only cluster), whose stderr is the user's.
    """

    name = "hpcpath-worker-log"
    idempotent = False

    def __init__(self, folder: str | os.PathLike[str], client_pid: int | None = None) -> None:
        self.folder = str(folder)
        self.client_pid = client_pid if client_pid is not None else os.getpid()

    def setup(self, worker: Any) -> None:
        if os.getpid() == self.client_pid:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            path = Path(self.folder, f"worker-{_this_node()}-{os.getpid()}.log")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:  # an unwritable folder: keep the terminal
            logger.debug("worker output stays on stderr: %s", exc)
            return
        import sys

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)

    def teardown(self, worker: Any) -> None:
        pass


def install_worker_log(client: Client, folder: str | os.PathLike[str]) -> None:
    """Send every worker's output (present and future workers) to ``folder``."""
    try:
        client.register_plugin(WorkerLog(os.path.abspath(folder)), name=WorkerLog.name)
    except Exception as exc:  # noqa: BLE001 - the run goes on with a noisy terminal
        logger.debug("cannot redirect worker output: %s", exc)

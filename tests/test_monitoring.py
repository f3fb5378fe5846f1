"""Watching a run: the dashboard link a command prints serves Dask's Bokeh dashboard and
hpcpath's own page while the run goes, a real browser draws them, the ssh tunnel printed on
a cluster names the right node and port, and worker output (TensorFlow's banners) stays out
of the terminal."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_resource

from hpcpath.cluster.monitor import dashboard_lines, render_page, task_key, tunnel_command

REPO = Path(__file__).resolve().parents[1]
HPCPATH = [sys.executable, "-m", "hpcpath.cli.main"]
BANNER = re.compile(r"cpu_feature_guard|This TensorFlow binary|oneDNN custom operations|"
                    r"absl::InitializeLog|^[IWE]0000 ", re.M)


# ------------------------------------------------------------------------------ pure parts
def test_task_keys_group_by_stage_on_the_dashboard():
    from dask.utils import key_split
    from distributed.utils import key_split_group

    for sid in ("slide_001", "tumor", "TCGA-A1-0001", "a b"):
        key = task_key("tile", sid, 0, "r1")
        assert key_split(key) == "tile" and key_split_group(key) == "tile"
        assert sid.replace("-", "_") in key
    assert key_split(task_key("predict-finish", "tumor", "r")) == "predict-finish"
    assert task_key("tile", "a", 1) != task_key("tile", "a", 2)


def test_tunnel_command_names_node_port_and_login():
    assert tunnel_command("10.77.0.11", 8787, node="n1", login="login1") == \
        "ssh -N -L 8787:n1:8787 login1"
    assert tunnel_command("127.0.0.1", 41000, node="n2", login="login1") == \
        "ssh -N -L 8787:127.0.0.1:41000 -J login1 n2"
    assert tunnel_command("127.0.0.1", 41000, node="login1", login="login1") == \
        "ssh -N -L 8787:127.0.0.1:41000 login1"


def test_dashboard_lines_add_a_tunnel_only_where_the_user_is_elsewhere():
    link = "http://127.0.0.1:41000/status"
    laptop = dashboard_lines(link, env={})
    assert laptop == ["dashboard http://127.0.0.1:41000/status  "
                      "(hpcpath progress: http://127.0.0.1:41000/hpcpath)"]
    node = socket.gethostname().split(".")[0]
    in_job = dashboard_lines(link, env={"SLURM_JOB_ID": "7", "SLURMD_NODENAME": node,
                                        "SLURM_SUBMIT_HOST": "login1.cluster"})
    assert in_job[1].startswith("dashboard from your machine: ssh -N -L 8787:127.0.0.1:41000 -J login1 ")
    on_slurm = dashboard_lines(link, on_cluster=True, env={})
    assert "ssh -N -L 8787:127.0.0.1:41000 " in on_slurm[1]
    # a host-less JupyterHub template is printed as it is, with no tunnel
    proxied = dashboard_lines("/user/ada/proxy/41000/status", env={"SLURM_JOB_ID": "7"})
    assert proxied == ["dashboard /user/ada/proxy/41000/status  "
                       "(hpcpath progress: /user/ada/proxy/41000/hpcpath)"]
    assert dashboard_lines("", env={}) == []


def test_run_page_counts_and_escapes():
    page = render_page([{"stage": "tile", "run": "r1", "label": "out/", "total": 10, "done": 6,
                         "failed": 1, "started": time.time() - 70, "finished": None,
                         "failures": [["<b>bad</b>", "not a slide"]], "recent": []}])
    assert "6 done" in page and "1 failed" in page and "3 remaining" in page
    assert "&lt;b&gt;bad&lt;/b&gt;" in page and "<b>bad</b>:" not in page
    assert 'style="width:60.0%"' in page
    assert '<section class="run running">' in page and "out/" in page
    assert "about 30 s left" in page  # 7 slides in 70 s: 3 more take about 30 s


def test_dashboard_link_honours_distributed_template(monkeypatch):
    import dask

    from hpcpath.cluster import cluster_client, dashboard_link

    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    with dask.config.set({"distributed.dashboard.link": "{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"}):
        with cluster_client({"backend": "local", "n_workers": 1}) as client:
            link = dashboard_link(client)
            port = client.scheduler_info()["services"]["dashboard"]
    assert link == f"/user/ada/proxy/{port}/status"


# ------------------------------------------------------------------------------ a live run
def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


class _Run:
    """A CLI command in the background whose stderr is read line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._t.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def synth_slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monitor")
    subprocess.run([*HPCPATH, "synth", "-o", str(root / "slides"), "-n", "3", "--size", "6000x6000",
                    "--seed", "5"], check=True, capture_output=True, timeout=300)
    return root / "slides"


def _chromium():
    from browser import chromium_binary

    if chromium_binary() is None:
        missing_resource("chromium is not installed: apt-get install chromium (bin/setup --system does)")


@pytest.mark.slow
def test_dashboard_serves_bokeh_and_hpcpath_progress_during_a_tile_run(synth_slides, tmp_path):
    from browser import capture, deep_count, save

    _chromium()
    # 32-px tiles: ~34k tiles, long enough (10-20 s here) to look at the dashboard mid-run
    run = _Run([*HPCPATH, "tile", str(synth_slides), "-o", str(tmp_path / "out"), "--workers", "1",
                "--tile-size", "32", "--chunk-tiles", "64", "--tiles-per-task", "64"], cwd=tmp_path)
    try:
        link = run.wait_for(r"dashboard (http://\S+/status)").group(1)
        base = link.rsplit("/status", 1)[0]
        status, body = _get(link)
        assert status == 200
        assert "needs bokeh" not in body.lower()
        assert "Dask Diagnostic UI" in body and "static/js/bokeh.min.js" in body  # a Bokeh document
        deadline = time.monotonic() + 30  # hpcpath's page: the run, its slides
        runs = []
        while not runs and time.monotonic() < deadline:
            runs = json.loads(_get(f"{base}/hpcpath/runs.json")[1])
            time.sleep(0.1)
        assert runs and runs[0]["stage"] == "tile" and runs[0]["total"] == 3
        assert runs[0]["finished"] is None  # looked at while it runs

        cap = capture(link, ready_js=f"{deep_count('canvas')} >= 4 && "
                                     "document.body.innerText.length > 0", timeout=40, settle=2.0)
        still_running = run.proc.poll() is None
        save(cap, tmp_path, "dask-status")
        page = capture(f"{base}/hpcpath", timeout=10, settle=0.2)
        save(page, tmp_path, "hpcpath-page")
    finally:
        rc = run.finish()
    assert rc == 0, run.output
    assert still_running, "the run ended before the browser had drawn the dashboard"
    assert cap.ready, "the dashboard drew no plots in 40 s"
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(cap.png)).convert("L"), dtype=float)
    assert img.shape == (1000, 1400)
    assert img.std() > 20 and (img < 200).mean() > 0.05  # plots drawn, not a blank page
    dom = cap.dom
    assert "Task Stream" in dom and "Progress" in dom  # the task stream and progress figures
    assert dom.count("<canvas") >= 4 and "bk-Figure" in dom
    assert "tile" in page.dom and "of 3 slides" in page.dom
    # nothing reached the terminal but hpcpath's own lines
    assert "Traceback" not in run.output
    assert all(line.startswith(("hpcpath:", "[tile]")) for line in run.lines), run.output
    logs = list((tmp_path / "out" / "hpcpath-logs").glob("worker-*.log"))
    assert logs, "worker output was not sent to the run's log folder"


@pytest.mark.slow
def test_inference_terminal_has_no_tensorflow_banners(synth_slides, tmp_path):
    """TensorFlow starts in every inference worker; its banners go to OUT/hpcpath-logs.

    TF_CPP_MIN_LOG_LEVEL=0 (what a user sets to debug TensorFlow) makes TensorFlow print all
    of them, so the test sees where they went rather than that they were never printed."""
    pytest.importorskip("keras")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    subprocess.run([*HPCPATH, "tile", str(synth_slides / "slide_000.svs"), "-o", str(tmp_path / "stores"),
                    "--workers", "1"], check=True, capture_output=True, timeout=300, env=env)
    code = (
        "import keras\n"
        "from keras import layers\n"
        "from hpcpath.modelio import ModelMeta, save_model\n"
        "inp = keras.Input((256, 256, 3), dtype='uint8')\n"
        "h = layers.GlobalAveragePooling2D()(layers.Rescaling(1 / 255)(inp))\n"
        "m = keras.Model(inp, layers.Dense(1, activation='sigmoid')(h))\n"
        f"save_model(m, {str(tmp_path / 'model')!r}, ModelMeta(patch_size=256, classes=('Tumor',),"
        " task='binary', architecture='tiny'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300, env=env)
    proc = subprocess.run([*HPCPATH, "infer", "--model", str(tmp_path / "model"), str(tmp_path / "stores"),
                           "-o", str(tmp_path / "preds"), "--workers", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 predicted" in out
    assert not BANNER.search(out), out
    logs = "".join(p.read_text(errors="replace")
                   for p in (tmp_path / "preds" / "hpcpath-logs").glob("worker-*.log"))
    assert BANNER.search(logs), "TensorFlow's start-up lines were not found in the worker log"


@pytest.mark.slow
def test_cluster_slurm_prints_the_tunnel_to_its_dashboard(local_slurm, synth_slides, tmp_path):
    spec = tmp_path / "cluster.yaml"
    spec.write_text(f"backend: slurm\njobs: 1\ncores: 1\nmemory: 2GB\nwalltime: '00:10:00'\n"
                    f"python: {sys.executable}\nlog_directory: {tmp_path / 'logs'}\nworker_timeout: 120\n")
    proc = subprocess.run([*HPCPATH, "tile", str(synth_slides / "slide_001.svs"), "-o", str(tmp_path / "out"),
                           "--cluster", str(spec)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    port = re.search(r"dashboard http://127\.0\.0\.1:(\d+)/status", proc.stderr).group(1)
    host = socket.gethostname().split(".")[0]
    assert f"dashboard from your machine: ssh -N -L 8787:127.0.0.1:{port} {host}" in proc.stderr

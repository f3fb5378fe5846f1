"""``hpcpath serve``: the HTTP API over a saved model, with real parts.

The models are hpcpath's own ``small_cnn`` (``hpcpath.train.models.build_model``, seeded, not
trained: serving does not care how good a model is, and training one costs CI minutes),
saved through ``hpcpath.modelio``.  The app runs in-process (Starlette's TestClient, which
also runs its start-up and shut-down) for schemathesis against its own OpenAPI spec, a real
patch of cmu-1-small-region.svs read with OpenSlide, the upload limits and a slide job on a
real Dask LocalCluster; one test starts ``hpcpath serve`` itself with uvicorn on a free port.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("keras")

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from hpcpath.config import InferConfig, ServeConfig

# Starlette 1.x asks for httpx2 under its TestClient; httpx is what it still uses here
pytestmark = pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient.")
PATCH = 64
HOST = "http://localhost"  # a loopback server answers to loopback Host names only


def _save(path: Path, task: str, classes: tuple[str, ...], seed: int) -> Path:
    import keras

    from hpcpath.config import ModelConfig
    from hpcpath.modelio import ModelMeta, save_model
    from hpcpath.train.models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(ModelConfig(architecture="small_cnn", width=4), PATCH, len(classes))
    logits = model.get_layer("logits")  # sharper than initial weights: scores that differ per patch
    w, b = logits.get_weights()
    logits.set_weights([w * 40.0, b])
    return save_model(model, path, ModelMeta(patch_size=PATCH, classes=classes, task=task,
                                             architecture="small_cnn"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve-models")
    _save(root / "tissue", "multilabel", ("Tumor", "Stroma"), 0)
    _save(root / "mitosis", "points", ("Mitosis",), 1)
    return root


@pytest.fixture(scope="module")
def client(models, tmp_path_factory):
    """The tissue model's app: roots = one folder of slides, uploads up to 1 MiB."""
    from starlette.testclient import TestClient

    from hpcpath.serve import create_app

    root = tmp_path_factory.mktemp("serve-root")
    app = create_app(models / "tissue", ServeConfig(roots=(str(root),), max_upload_mb=1,
                                                   out=str(tmp_path_factory.mktemp("serve-out"))))
    with TestClient(app, base_url=HOST) as c:
        c.root = root
        yield c


# ----------------------------------------------------------------------------- schemathesis
@pytest.fixture(scope="module")
def api_schema(models, tmp_path_factory):
    """The app's own spec; its only root is an empty folder (no generated path can queue a
    job), Host check off (the ASGI test transport's Host is 'testserver')."""
    from hpcpath.serve import create_app

    app = create_app(models / "tissue", ServeConfig(roots=(str(tmp_path_factory.mktemp("empty")),)),
                     check_host=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_conforms_to_its_own_spec(api_schema):
    """Every operation, positive and negative data, 25 examples each (no deadline): no 5xx,
    only documented status codes and content types, bodies that match their response models.
    (Hypothesis driven directly: schemathesis' pytest plugin does not run under pytest 9.)"""
    from hypothesis import given

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    ops = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in ops} >= {"POST /predict", "POST /slides", "GET /slides/{job_id}",
                                        "GET /slides/{job_id}/heatmap.png", "GET /model"}
    for op in ops:
        takes_input = bool(list(op.iter_parameters())) or len(op.body) > 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 + takes_input]:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                case.call_and_validate(checks=checks)

            check()


# ----------------------------------------------------------------------------- /predict
def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _real_patches(test_data: Path) -> np.ndarray:
    """Four 64 px windows of cmu-1-small-region.svs read with OpenSlide the way inference
    reads windows from a slide (``hpcpath.infer.reader.slide_pieces``, level-0 centres)."""
    from hpcpath.infer.reader import slide_pieces
    from hpcpath.io import open_slide

    slide = open_slide(test_data / "slides" / "cmu-1-small-region.svs", backend="openslide")
    centres = np.array([[700.0, 500.0], [1200.0, 900.0], [300.0, 1500.0], [1800.0, 1300.0]])
    (idx, arrays), = slide_pieces(slide, centres, 1.0, PATCH)
    out = np.empty((len(centres), PATCH, PATCH, 3), np.uint8)
    out[idx] = arrays["main"]
    return out


def test_predict_round_trips_a_real_patch(client, models, test_data):
    """PNG and .npy uploads of real slide patches give the model's own probabilities
    (keras predict on the same uint8 patches, and hpcpath's inference predictor)."""
    import keras

    from hpcpath.infer.model import cached_model

    patches = _real_patches(test_data)
    lm = cached_model(models / "tissue")
    direct = np.asarray(keras.saving.load_model(models / "tissue" / "model.keras").predict(patches, verbose=0))
    ours = lm.predict(patches, InferConfig().batch_size)
    assert np.ptp(direct[:, 0]) > 1e-2, "the patches' scores barely differ: the test would prove little"

    r = client.post("/predict", files={"file": ("patch.png", _png(patches[0]), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["Tumor", "Stroma"]  # as the model folder records them
    got = np.array([[p[c] for c in body["classes"]] for p in body["probabilities"]])
    assert got.shape == (1, 2)
    np.testing.assert_allclose(got[0], direct[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[0], ours[0], rtol=1e-5, atol=1e-7)

    r = client.post("/predict", files={"file": ("batch.npy", _npy(patches))})
    assert r.status_code == 200, r.text
    got = np.array([[p[c] for c in ("Tumor", "Stroma")] for p in r.json()["probabilities"]])
    np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-6)

    r = client.post("/predict?tta=true", files={"file": ("batch.npy", _npy(patches))})
    got = np.array([[p[c] for c in ("Tumor", "Stroma")] for p in r.json()["probabilities"]])
    np.testing.assert_allclose(got, lm.predict(patches, InferConfig().batch_size, tta=True), rtol=1e-5, atol=1e-7)


def test_upload_limits_and_types(client):
    """Over the limit: 413 with a JSON error, with or without a Content-Length (chunked); not
    an image or .npy: 415; the wrong patch size, dtype or shape: 422; all one-line JSON."""
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (1 << 20)
    for r in (client.post("/predict", files={"file": ("big.png", big, "image/png")}),
              client.post("/predict", content=iter([big[:1000], big[1000:]]),
                          headers={"content-type": "multipart/form-data; boundary=x"})):
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {"error": "request body over the 1 MiB limit (--max-upload-mb)"}
    cases = [
        (("notes.png", b"just text, called .png", "image/png"), 415, "not a PNG or JPEG"),
        (("p.png", _png(np.zeros((32, 48, 3), np.uint8)), "image/png"), 422, "takes 64x64 patches, got 48x32"),
        (("p.npy", _npy(np.zeros((2, PATCH, PATCH, 3), np.float32)), None), 422, "must be uint8"),
        (("p.npy", _npy(np.zeros((PATCH, PATCH, 4), np.uint8)), None), 422, "expected shape"),
        (("p.npy", _npy(np.zeros((PATCH, PATCH, 3), object)), None), 422, "must be uint8"),
        (("p.npy", _npy(np.zeros((2, PATCH, PATCH, 3), np.uint8))[:-5], None), 422, "header says"),
    ]
    for (name, data, ctype), status, text in cases:
        r = client.post("/predict", files={"file": (name, data, ctype) if ctype else (name, data)})
        assert r.status_code == status, (name, r.text)
        assert text in r.json()["error"] and "\n" not in r.json()["error"]
    r = client.post("/predict", json={"file": "x"})
    assert r.status_code == 422 and r.json()["error"].startswith("body.file")


# ----------------------------------------------------------------------------- /slides
def test_slide_paths_stay_inside_the_roots(client, tmp_path):
    root = client.root
    (tmp_path / "secret.svs").write_bytes(b"x")
    (root / "link.svs").symlink_to(tmp_path / "secret.svs")
    (root / "folder").mkdir()
    for path, status in [(str(tmp_path / "secret.svs"), 403), ("../" * 12 + "etc/passwd", 403),
                         ("/etc/passwd", 403), ("link.svs", 403), ("missing.svs", 404),
                         (str(root / "missing.svs"), 404), ("folder", 422), ("a\x00b", 422)]:
        r = client.post("/slides", json={"path": path})
        assert r.status_code == status, (path, r.text)
        assert set(r.json()) == {"error"}
    assert client.get("/slides").json() == []  # nothing was queued


def _wait(c, job: dict, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
        job = c.get(f"/slides/{job['id']}").json()
    return job


@pytest.mark.slow
def test_slide_job_runs_to_done_on_a_local_cluster(models, tmp_path):
    """POST /slides on a small synthetic slide, a points model, a real LocalCluster (started by
    the first job through the CLI's session code): queued/running -> done, the heatmap PNG
    decodes, the detections are QuPath GeoJSON, the summary has the slide's scores; then the
    store that job made, named relative to a root, as a second job."""
    from PIL import Image
    from starlette.testclient import TestClient

    from hpcpath.cli.common import dask_session
    from hpcpath.serve import create_app
    from hpcpath.synth import make_cohort

    make_cohort(tmp_path / "slides", n=1, width=2048, height=2048, seed=7)
    (tmp_path / "out").mkdir()
    roots = (str(tmp_path / "slides"), str(tmp_path / "out"))
    app = create_app(models / "mitosis", ServeConfig(roots=roots, out=str(tmp_path / "out")),
                     session=partial(dask_session, "local", 1))  # as hpcpath serve does
    with TestClient(app, base_url=HOST) as c:
        r = c.post("/slides", json={"path": "slide_000.svs"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and job["result"] is None
        assert c.get(f"/slides/{job['id']}/heatmap.png").status_code in (409, 200)
        job = _wait(c, job)
        assert job["status"] == "done", job
        assert job["slide_id"] == "slide_000" and job["message"] is None
        assert job["result"]["summary"]["windows"] > 0 and 0 <= job["result"]["summary"]["max_prob"] <= 1
        png = c.get(job["result"]["heatmap"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        im = Image.open(io.BytesIO(png.content))
        im.load()
        assert min(im.size) > 16
        geo = c.get(job["result"]["detections"])
        assert geo.status_code == 200
        doc = geo.json()
        assert doc["type"] == "FeatureCollection"
        assert all(f["properties"]["classification"]["name"] == "Mitosis" for f in doc["features"])
        # a second job on the store the first one made (OUT is a root too): predictions into it
        store = tmp_path / "out" / job["id"] / "stores" / "slide_000.zarr"
        r = c.post("/slides", json={"path": str(store.relative_to(tmp_path / "out"))})
        assert r.status_code == 202, r.text
        second = _wait(c, r.json())
        assert second["status"] == "done", second
        assert second["result"]["summary"]["windows"] == job["result"]["summary"]["windows"]
        assert second["result"]["summary"]["max_prob"] == pytest.approx(job["result"]["summary"]["max_prob"])
        assert (store / "predictions" / "mitosis").is_dir()
        assert [j["id"] for j in c.get("/slides").json()] == [job["id"], second["id"]]


# ----------------------------------------------------------------------------- the CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_hpcpath_serve_runs_uvicorn_and_answers(models, tmp_path):
    """``hpcpath serve MODEL`` as a user starts it: uvicorn on loopback, the model's info, a
    prediction, 413 over the limit through a real socket, 400 for a foreign Host, a clean
    exit on SIGINT, no traceback."""
    import httpx

    from hpcpath.infer.model import cached_model

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hpcpath.cli.main", "serve", str(models / "tissue"),
                             "--port", str(port), "--max-upload-mb", "0.5", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                info = httpx.get(f"{base}/model", timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "hpcpath serve did not come up"
                time.sleep(0.5)
        assert info.status_code == 200 and info.json()["classes"] == ["Tumor", "Stroma"]
        patch = np.random.default_rng(3).integers(0, 256, (PATCH, PATCH, 3), dtype=np.uint8)
        r = httpx.post(f"{base}/predict", files={"file": ("p.png", _png(patch), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        want = cached_model(models / "tissue").predict(patch[None], InferConfig().batch_size)[0]
        np.testing.assert_allclose([r.json()["probabilities"][0][c] for c in ("Tumor", "Stroma")], want,
                                   rtol=1e-5, atol=1e-7)
        r = httpx.post(f"{base}/predict", files={"file": ("p.npy", b"\x93NUMPY" + b"\0" * (600 << 10))}, timeout=60)
        assert r.status_code == 413 and r.json()["error"].startswith("request body over the 0.5 MiB")
        r = httpx.get(f"{base}/model", headers={"Host": "attacker.example"}, timeout=10)
        assert r.status_code == 400 and "Host" in r.json()["error"]
        spec = httpx.get(f"{base}/openapi.json", timeout=10).json()
        assert {"/predict", "/slides", "/slides/{job_id}", "/slides/{job_id}/heatmap.png"} <= set(spec["paths"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert f"on http://127.0.0.1:{port}" in out
    assert not (tmp_path / "out" / ".hpcpath-lock").exists()  # released on shut-down


def test_cli_bad_input_is_one_line(models, tmp_path):
    for args, text in [([str(tmp_path / "nomodel")], "hpcpath-model.json"),
                       ([str(models / "tissue"), "--root", str(tmp_path / "nope")], "--root: no such folder"),
                       ([str(models / "tissue"), "--port", "70000"], "port:"),
                       ([str(models / "tissue"), "--max-upload-mb", "0"], "max_upload_mb:")]:
        proc = subprocess.run([sys.executable, "-m", "hpcpath.cli.main", "serve", *args],
                              capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcpath")]
        assert len(lines) == 1 and text in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr

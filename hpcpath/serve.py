"""``hpcpath serve``: one saved model behind a small HTTP API (FastAPI, run by uvicorn).

* ``POST /predict``: patches (a PNG or JPEG image, or a ``.npy`` uint8 array) -> the
  probability of every class, predicted in this process by the same
  :class:`hpcpath.infer.model.LoadedModel` the inference workers use (uint8 RGB patches at
  the model's resolution, fixed-size padded batches; the model rescales inside), loaded once
  at start-up.
* ``POST /slides``: a slide or slide store inside the folders given with ``--root``, queued
  for :func:`hpcpath.infer.infer_slides` on the configured Dask cluster (started on the first
  job, through the CLI's session code); ``GET /slides/{id}`` its status and results.

Anything a client gets wrong is a 4xx with a one-line JSON body ``{"error": "..."}``, never a
traceback.  Request bodies are capped before anything parses them (413), uploads are
recognised by their bytes, not by their declared type (415), ``.npy`` files are read without
pickles, images are checked for size before they are decoded.
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, which
# name types imported inside create_app
import io
import math
import os
import queue
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hpcpath.config import InferConfig, ServeConfig, describe_error
from hpcpath.errors import ConfigError, HpcpathError

__all__ = ["RequestError", "SlideJobs", "create_app", "decode_patches", "resolve_in_roots"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
NPY_MAGIC = b"\x93NUMPY"
_IMAGE_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr")
_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
_SUMMARY_KEYS = ("windows", "tasks", "max_prob", "mean_prob", "topk_mean", "positive_fraction",
                 "detections", "detections_per_mm2", "hpf10_max", "proliferation_score",
                 "tissue_mm2", "mpp", "seconds")


class RequestError(Exception):
    """A client's mistake: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------- API models
class ErrorBody(BaseModel):
    """Every error: one line, no traceback."""

    error: str = Field(examples=["the model takes 64x64 patches, got 100x80"])


class ModelInfo(BaseModel):
    name: str = Field(description="the predictions' name in slide stores (POST /slides)")
    task: str = Field(description="binary | multilabel | points (points models give detections)")
    classes: list[str] = Field(description="one name per output, as the model folder records them")
    patch_size: int = Field(description="patches are patch_size x patch_size RGB")
    patch_mpp: float | None = Field(description="microns per patch pixel the model was trained at")
    patch_downsample: float | None = Field(description="level-0 pixels per patch pixel")
    inputs: list[str]
    architecture: str
    digest: str = Field(description="content digest of the model's files")


class PredictResponse(BaseModel):
    classes: list[str]
    probabilities: list[dict[str, float | None]] = Field(
        description="one mapping class name -> probability per patch, in upload order")


class SlideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096,
                      description="a slide file or a .zarr slide store on the server: absolute, or "
                                  "relative to one of the server's --root folders",
                      examples=["slides/case_01.svs"])


class SlideResult(BaseModel):
    heatmap: str = Field(description="URL of the heatmap overlay PNG")
    detections: str | None = Field(description="URL of the detections GeoJSON (points models)")
    summary: dict[str, float | int | None] = Field(description="the slide's row of summary.csv")


class SlideJob(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    message: str | None = Field(description="why it failed, one line")
    slide_id: str | None
    submitted: str
    started: str | None
    finished: str | None
    result: SlideResult | None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "bad request (Host header, malformed body)", 403: "path outside the allowed roots",
            404: "no such job, file or result", 409: "the job is not done", 413: "request body over the limit",
            415: "not a PNG, JPEG or .npy upload", 422: "invalid input",
            503: "slide queue full"}
    return {c: {"model": ErrorBody, "description": what[c]} for c in codes}


# ----------------------------------------------------------------------------- patches
def decode_patches(data: bytes, patch: int, max_batch: int) -> np.ndarray:
    """``(N, patch, patch, 3)`` uint8 from an upload, recognised by its bytes: a PNG or JPEG
    image (one patch; greyscale and palette images converted to RGB, alpha dropped) or a
    ``.npy`` uint8 array ``(patch, patch, 3)`` or ``(N, patch, patch, 3)``.  Patches are
    taken as they are -- at the model's resolution, as inference reads them -- never resized."""
    if data.startswith(NPY_MAGIC):
        return _npy(data, patch, max_batch)
    if data.startswith((PNG_MAGIC, JPEG_MAGIC)):
        return _image(data, patch)
    raise RequestError(415, "file: not a PNG or JPEG image or a .npy array")


def _image(data: bytes, patch: int) -> np.ndarray:
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))  # reads the header only: the size is checked first
        size, mode = im.size, im.mode
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise RequestError(422, f"file: cannot read the image ({_line(exc)})") from None
    if size != (patch, patch):
        raise RequestError(422, f"file: the model takes {patch}x{patch} patches, got {size[0]}x{size[1]}")
    if mode not in _IMAGE_MODES:
        raise RequestError(422, f"file: pixel mode {mode!r} is not an 8-bit image")
    try:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise RequestError(422, f"file: cannot decode the image ({_line(exc)})") from None
    return rgb[None]


def _npy(data: bytes, patch: int, max_batch: int) -> np.ndarray:
    """A .npy array read by its header, without pickles and without trusting its shape."""
    fmt = np.lib.format
    f = io.BytesIO(data)
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported")
    except Exception as exc:  # noqa: BLE001 - any malformed header
        raise RequestError(422, f"file: not a readable .npy array ({_line(exc)})") from None
    if dtype != np.uint8:
        raise RequestError(422, f"file: patches must be uint8 (RGB 0-255), got {dtype}")
    want = (patch, patch, 3)
    if tuple(shape) == want:
        shape = (1, *want)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise RequestError(422, f"file: expected shape {want} or (N, {patch}, {patch}, 3), got {tuple(shape)}")
    if not 1 <= shape[0] <= max_batch:
        raise RequestError(422, f"file: 1 to {max_batch} patches per request, got {shape[0]}")
    count = int(np.prod(shape))
    raw = f.read(count + 1)
    if len(raw) != count:
        raise RequestError(422, f"file: .npy data is {len(raw)} bytes, its header says {count}")
    arr = np.frombuffer(raw, np.uint8).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr)


def predict_patches(lm, patches: np.ndarray, cfg: InferConfig, tta: bool) -> np.ndarray:
    """(N, C) probabilities, in batches of the inference ``batch_size`` through the model's
    own predictor (padded batches, same traced function as ``hpcpath infer``)."""
    b = cfg.batch_size
    parts = [lm.predict(patches[i:i + b], b, tta, xla=cfg.xla, mixed=cfg.mixed_precision)
             for i in range(0, len(patches), b)]
    return np.concatenate(parts) if parts else np.zeros((0, lm.n_outputs), np.float32)


# ----------------------------------------------------------------------------- paths
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_in_roots(raw: str, roots: Sequence[Path]) -> Path:
    """The slide or store ``raw`` names, symlinks resolved, if it lies inside one of
    ``roots`` (already resolved); else 403 (outside: whether it exists is not told), 404
    (inside, missing) or 422 (not a slide file or store)."""
    if not roots:
        raise RequestError(403, "path: this server reads no folders (start it with --root DIR)")
    try:
        os.fsencode(raw)
        if "\x00" in raw:
            raise ValueError("NUL")
    except (UnicodeError, ValueError):
        raise RequestError(422, "path: not a valid file name") from None
    p = Path(raw)
    candidates = [p] if p.is_absolute() else [r / p for r in roots]
    inside = []
    for c in candidates:
        try:
            real = os.path.realpath(c)
        except (OSError, ValueError):
            continue
        if any(_inside(real, str(r)) for r in roots):
            inside.append(Path(real))
    if not inside:
        raise RequestError(403, f"{raw}: outside the folders this server may read")
    found = next((q for q in inside if os.path.exists(q)), None)
    if found is None:
        raise RequestError(404, f"{raw}: no such slide or store")
    if os.path.isdir(found) and found.suffix != ".zarr":
        from hpcpath.io import discover_slides

        if discover_slides([found]) != [found]:  # a DICOM series folder is one slide
            raise RequestError(422, f"{raw}: a folder; name one slide file or one .zarr store")
    return found


# ----------------------------------------------------------------------------- slide jobs
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class _Job:
    id: str
    source: Path
    out: Path
    status: str = "queued"
    message: str | None = None
    slide_id: str | None = None
    submitted: str = field(default_factory=_now)
    started: str | None = None
    finished: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    heatmap: Path | None = None
    detections: Path | None = None

    def api(self) -> SlideJob:
        result = None
        if self.status == "done":
            base = f"/slides/{self.id}"
            result = SlideResult(heatmap=f"{base}/heatmap.png",
                                 detections=f"{base}/detections.geojson" if self.detections else None,
                                 summary=self.summary)
        return SlideJob(id=self.id, status=self.status, message=self.message,  # type: ignore[arg-type]
                        slide_id=self.slide_id, submitted=self.submitted, started=self.started,
                        finished=self.finished, result=result)


class SlideJobs:
    """Slide jobs, run one after another on a thread with :func:`hpcpath.infer.infer_slides`
    on one Dask cluster, started by the first job and kept: ``session(out)``, a context
    manager that yields a client (``hpcpath serve`` passes the CLI's ``dask_session``: the
    dashboard link, worker logs in ``OUT/hpcpath-logs``), else
    :func:`hpcpath.cluster.cluster_client` of ``cluster``.  Each job writes into
    ``OUT/<id>/`` (slides are tiled into ``OUT/<id>/stores``; a store gets
    ``predictions/<name>`` where it is)."""

    def __init__(self, model_dir: Path, out: Path, cfg: InferConfig, roots: Sequence[Path],
                 max_queue: int, cluster: Any = None, workers: int | None = None, client=None,
                 session: Callable[[Path], AbstractContextManager] | None = None) -> None:
        self.model_dir, self.out, self.cfg, self.roots = model_dir, out, cfg, list(roots)
        self.cluster, self.workers, self.session = cluster, workers, session
        self.jobs: dict[str, _Job] = {}
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._stack = ExitStack()
        self._client = client
        self._thread: threading.Thread | None = None

    def submit(self, source: Path) -> _Job:
        job_id = uuid.uuid4().hex
        job = _Job(job_id, source, self.out / job_id)
        with self._lock:
            try:
                self._q.put_nowait(job)
            except queue.Full:
                raise RequestError(503, f"{self._q.maxsize} slide jobs are waiting; try again later") from None
            self.jobs[job.id] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hpcpath-serve-jobs", daemon=True)
                self._thread.start()
        return job

    def get(self, job_id: str) -> _Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no slide job {job_id}")
        return job

    def _loop(self) -> None:
        try:
            while True:
                job = self._q.get()
                if job is None:
                    return
                self._run(job)
        finally:
            self._stack.close()  # the cluster, from the thread that started it

    def _session(self):
        if self._client is None:
            if self.session is not None:
                ctx = self.session(self.out)
            else:
                from hpcpath.cluster import cluster_client

                ctx = cluster_client(self.cluster, n_workers_override=self.workers)
            self._client = self._stack.enter_context(ctx)
        return self._client

    def _run(self, job: _Job) -> None:
        from hpcpath.infer.tasks import output_paths
        from hpcpath.workflows import infer_inputs

        job.status, job.started = "running", _now()
        status, message = "failed", None
        try:
            res = infer_inputs([str(job.source)], self.model_dir, job.out, self.cfg,
                               client=self._session(), slide_dirs=list[str | os.PathLike](self.roots))
            if not res.rows:
                raise HpcpathError("no slide found there", str(job.source))
            row = res.rows[0]
            job.slide_id = row.get("slide_id")
            if row["status"] != "complete":
                raise HpcpathError(_line(row.get("error") or "failed"))
            paths = output_paths(str(job.out), row["slide_id"])
            job.heatmap = paths["overlay"]
            job.detections = paths["geojson"] if paths["geojson"].exists() else None
            job.summary = {k: _number(row.get(k)) for k in _SUMMARY_KEYS if k in row}
            status = "done"
        except HpcpathError as exc:
            message = _line(exc)
        except Exception as exc:  # noqa: BLE001 - the client gets one line, the log the rest
            traceback.print_exc(file=sys.stderr)
            message = f"internal error: {type(exc).__name__}: {_line(exc)}"
        finally:  # finished first: a job seen done or failed always has its end time
            job.finished = _now()
            job.message, job.status = message, status

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            thread = self._thread
            if thread is None:
                self._stack.close()
                return
            self._thread = None
        while True:  # jobs still waiting are dropped; the running one may finish
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(None)
        thread.join(timeout)


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or v is None or v == "":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return int(x) if isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit()) else x


# ----------------------------------------------------------------------------- the app
class _Guard:
    """ASGI middleware in front of everything: the Host header (loopback servers answer only
    to loopback names, so a web page cannot reach them by DNS rebinding) and the body size,
    counted as it arrives -- over the limit is a 413 before any parser sees a byte."""

    def __init__(self, app, max_body: int, hosts: set[str] | None) -> None:
        self.app, self.max_body, self.hosts = app, max_body, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in self.hosts:
                return await _send_error(send, 400, "Host header: this server answers to loopback names only")
        limit = f"request body over the {self.max_body / (1 << 20):g} MiB limit (--max-upload-mb)"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_error(send, 400, "Content-Length: not a number")
            if n > self.max_body:
                return await _send_error(send, 413, limit)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_body:
                return await _send_error(send, 413, limit)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str) -> None:
    import json

    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def _roots(raw: Sequence[str]) -> list[Path]:
    out = []
    for r in raw:
        real = Path(os.path.realpath(r))
        if not real.is_dir():
            raise ConfigError("--root: no such folder", r)
        out.append(real)
    return out


def create_app(model_dir: str | os.PathLike, config: ServeConfig | None = None,
               infer_config: InferConfig | None = None, *, cluster: Any = None,
               workers: int | None = None, client=None,
               session: Callable[[Path], AbstractContextManager] | None = None,
               check_host: bool | None = None):
    """The FastAPI app serving the model in ``model_dir``: loads the model (one-line
    HpcpathError if it cannot), checks the roots and the output folder.  Testable in-process
    (``starlette.testclient.TestClient``); ``hpcpath serve`` runs it with uvicorn.

    ``cluster``/``workers``: where slide jobs run (a cluster spec as ``--cluster`` takes;
    default a LocalCluster), or ``session``, ``out -> context manager yielding a client``
    (see :class:`SlideJobs`), or ``client``, an existing Dask client.  ``check_host``: answer
    only to loopback Host names (default: when ``config.host`` is loopback)."""
    from fastapi import FastAPI, File, Query, UploadFile
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from hpcpath._version import __version__
    from hpcpath.infer.model import cached_model, model_digest
    from hpcpath.infer.run import check_model, prediction_name

    cfg = config or ServeConfig()
    icfg = infer_config or InferConfig()
    model_dir = Path(model_dir)
    meta = check_model(model_dir, icfg)  # cheap checks first, TensorFlow last
    roots = _roots(cfg.roots)
    stack = ExitStack()
    if cfg.out is None:
        out = Path(tempfile.mkdtemp(prefix="hpcpath-serve-"))
    else:
        from hpcpath.runlock import run_lock
        from hpcpath.store import check_output_dir

        out = Path(check_output_dir(cfg.out))
        stack.enter_context(run_lock(out, "hpcpath serve"))  # one server per output folder
    try:
        lm = cached_model(model_dir)  # once, here: every request uses this one
    except BaseException:
        stack.close()
        raise
    info = ModelInfo(name=prediction_name(model_dir, icfg.name), task=meta.task,
                     classes=list(lm.classes), patch_size=int(meta.patch_size),
                     patch_mpp=meta.patch_mpp, patch_downsample=meta.patch_downsample,
                     inputs=list(meta.inputs), architecture=meta.architecture,
                     digest=model_digest(model_dir))
    jobs = SlideJobs(model_dir, out, icfg, roots, cfg.max_queue, cluster, workers, client, session)
    stack.callback(jobs.close)
    predict_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(stack.close)

    app = FastAPI(title="hpcpath serve", version=__version__, lifespan=lifespan,
                  description=f"Model {info.name!r} ({info.task}; classes {', '.join(info.classes)}; "
                              f"{info.patch_size} px patches).  Errors: one-line JSON {{\"error\": ...}}.",
                  responses=_errors(400))
    app.state.model_info = info
    app.state.jobs = jobs
    app.state.out = out
    app.state.close = stack.close
    hosts = _LOOPBACK_NAMES if (cfg.loopback if check_host is None else check_host) else None
    app.add_middleware(_Guard, max_body=cfg.max_upload_bytes, hosts=hosts)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        headers = {"Retry-After": "60"} if exc.status == 503 else None
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse({"error": _line(str(exc.detail))}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        msg = describe_error(dict(errors[0])) if errors else "invalid request"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse({"error": _line(msg) + more}, 422)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):  # logged by the server, one line here
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)

    JobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="job id from POST /slides")]

    @app.get("/model", response_model=ModelInfo, summary="The model this server runs")
    def model_info() -> ModelInfo:
        return info

    @app.post("/predict", response_model=PredictResponse, responses=_errors(413, 415, 422),
              summary="Probabilities per class for uploaded patches")
    async def predict(
        file: Annotated[UploadFile, File(description=(
            f"one {info.patch_size}x{info.patch_size} PNG or JPEG patch, or a .npy uint8 array "
            f"({info.patch_size}, {info.patch_size}, 3) or (N, {info.patch_size}, {info.patch_size}, 3), "
            f"N <= {cfg.max_batch}; at the model's resolution, never resized"))],
        tta: Annotated[bool, Query(description="average the 8 dihedral transforms")] = False,
    ) -> PredictResponse:
        if len(info.inputs) > 1:
            raise RequestError(422, f"this model also takes context inputs ({', '.join(info.inputs[1:])}); "
                                    "send its slide to POST /slides")
        data = await file.read()
        patches = decode_patches(data, info.patch_size, cfg.max_batch)

        def run():
            with predict_lock:
                return predict_patches(lm, patches, icfg, tta)

        probs = await run_in_threadpool(run)
        return PredictResponse(classes=info.classes, probabilities=[
            {c: (float(v) if math.isfinite(v) else None) for c, v in zip(info.classes, row)}
            for row in probs.tolist()])

    @app.post("/slides", response_model=SlideJob, status_code=202,
              responses=_errors(403, 404, 413, 422, 503),
              summary="Queue a slide or slide store for inference on the cluster")
    def submit(req: SlideRequest) -> SlideJob:
        return jobs.submit(resolve_in_roots(req.path, roots)).api()

    @app.get("/slides", response_model=list[SlideJob], summary="Every slide job since start-up")
    def list_jobs() -> list[SlideJob]:
        return [j.api() for j in list(jobs.jobs.values())]

    @app.get("/slides/{job_id}", response_model=SlideJob, responses=_errors(404, 422),
             summary="A slide job's status and, when done, its results")
    def job_status(job_id: JobId) -> SlideJob:
        return jobs.get(job_id).api()

    def _done(job_id: str) -> _Job:
        job = jobs.get(job_id)
        if job.status != "done":
            raise RequestError(409 if job.status in ("queued", "running") else 404,
                               f"slide job {job_id} is {job.status}")
        return job

    @app.get("/slides/{job_id}/heatmap.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}, "description": "the heatmap over the slide"},
                        **_errors(404, 409, 422)},
             summary="The heatmap overlay of a finished job (PNG)")
    def heatmap(job_id: JobId):
        path = _done(job_id).heatmap
        assert path is not None  # set on every done job
        return FileResponse(path, media_type="image/png")

    @app.get("/slides/{job_id}/detections.geojson", response_class=FileResponse,
             responses={200: {"content": {"application/geo+json": {}},
                              "description": "detections, QuPath's GeoJSON"},
                        **_errors(404, 409, 422)},
             summary="The detections of a finished job (points models)")
    def detections(job_id: JobId):
        job = _done(job_id)
        if job.detections is None:
            raise RequestError(404, f"model {info.name!r} ({info.task}) makes no detections")
        return FileResponse(job.detections, media_type="application/geo+json")

    return app

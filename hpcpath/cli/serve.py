"""``hpcpath serve``: a saved model behind a small HTTP API (``hpcpath.serve``, uvicorn)."""

from __future__ import annotations

import click

from hpcpath.cli.common import cluster_options, dask_session, echo_err


@click.command()
@click.argument("model_dir", metavar="MODEL", type=click.Path())
@click.option("--host", default=None, help="Address to listen on [127.0.0.1: this machine only]; "
              "another address (0.0.0.0: every interface) opens the API to the network.")
@click.option("--port", type=int, default=None, help="Port [8000].")
@click.option("--max-upload-mb", type=float, default=None, help="Largest request body, MiB; above: HTTP 413 [8].")
@click.option("--max-batch", type=int, default=None, help="Most patches in one .npy upload [256].")
@click.option("--max-queue", type=int, default=None, help="Slide jobs waiting at most; above: HTTP 503 [64].")
@click.option("--root", "roots", multiple=True, type=click.Path(),
              help="A folder whose slides and stores POST /slides may name (repeatable). None: "
                   "POST /slides refuses every path.")
@click.option("-o", "--out", default=None, type=click.Path(),
              help="Folder for slide jobs' outputs, OUT/<job id>/ [a new temporary folder].")
@click.option("--config", "config_file", type=click.Path(),
              help="YAML with infer options (top level or under 'infer:') for /predict and /slides.")
@cluster_options
def serve(model_dir, host, port, max_upload_mb, max_batch, max_queue, roots, out, config_file,
          cluster, workers):
    """Serve MODEL over HTTP: POST /predict (patches -> probabilities per class), POST /slides
    (a slide or store under a --root -> a job on the Dask cluster), GET /slides/{id} (status,
    heatmap PNG, detections GeoJSON).  OpenAPI at /openapi.json, pages at /docs.

    Loopback only unless --host says otherwise; there is no authentication, so put a reverse
    proxy with TLS and logins in front of anything but 127.0.0.1.
    """
    from hpcpath.cluster import parse_cluster_spec
    from hpcpath.config import InferConfig, ServeConfig
    from hpcpath.errors import ConfigError

    scfg = ServeConfig.load(host=host, port=port, max_upload_mb=max_upload_mb, max_batch=max_batch,
                            max_queue=max_queue, roots=tuple(roots), out=out)
    icfg = InferConfig.load(config_file)
    spec = parse_cluster_spec(cluster)  # a bad spec is refused now, not at the first slide job
    try:
        import uvicorn

        from hpcpath.serve import create_app
    except ImportError as exc:
        raise ConfigError(f"hpcpath serve needs the 'serve' extra ({exc.name} is missing): "
                          "pip install 'hpcpath[serve]'") from None
    from functools import partial

    # slide jobs' cluster: the session every command uses (dashboard link, worker logs in OUT)
    app = create_app(model_dir, scfg, icfg, session=partial(dask_session, spec, workers))
    if not scfg.loopback:
        echo_err(f"hpcpath: warning: listening on {scfg.host}: anyone who reaches port {scfg.port} can "
                 "use the model and queue slides under the roots (no authentication, no TLS)")
    shown = f"[{scfg.host}]" if ":" in scfg.host else scfg.host
    echo_err(f"hpcpath: serving {app.state.model_info.name!r} on http://{shown}:{scfg.port} "
             f"(API: /docs, /openapi.json); slide jobs in {app.state.out}")
    uvicorn.run(app, host=scfg.host, port=scfg.port, log_level="info", server_header=False)

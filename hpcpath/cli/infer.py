"""``hpcpath infer``: a saved model over slides or slide stores, on Dask workers (GPUs)."""

from __future__ import annotations

import sys
import time

import click

from hpcpath.cli.common import backend_session, cluster_options
from hpcpath.cli.options import config_option, config_options
from hpcpath.config import InferConfig


class _Report:
    """One line per failed slide at once; a status line every ``interval`` seconds."""

    def __init__(self, interval: float = 10.0) -> None:
        self.t0 = self.last = time.perf_counter()
        self.interval = interval
        self.slides = self.done = self.windows = 0

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "start":
            self.slides = info["slides"]
        elif kind == "windows":
            self.windows += info["n"]
        elif kind == "tiling":
            click.echo(f"hpcpath: tiling {info['slides']} slide(s) first", err=True)
        elif kind == "slide":
            self.done += 1
            row = info["row"]
            if row["status"] == "failed":
                click.echo(f"hpcpath: {row['error']}", err=True)
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self.status()

    def status(self) -> None:
        secs = time.perf_counter() - self.t0
        click.echo(f"[infer] slides {self.done}/{self.slides}  windows {self.windows}  "
                   f"{self.windows / max(secs, 1e-9):,.0f} windows/s  {secs:,.0f}s", err=True)


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="SLIDES_OR_STORES...")
@click.option("--model", "model_dir", required=True, type=click.Path(),
              help="Model folder (model.keras + hpcpath-model.json).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(),
              help="Output folder: overlays, detections, summary.csv, tasks.csv (slides are tiled into OUT/stores).")
@click.option("--config", "config_file", type=click.Path(),
              help="YAML with infer options (top level or under 'infer:').")
@config_options(InferConfig, "name", "mode", "stride", "batch_size", "tta", "tissue_threshold",
                "windows_per_task", "threshold", "merge")
@config_option(InferConfig, "radius_px", "--radius", "radius_px")
@config_option(InferConfig, "score_class")
@config_option(InferConfig, "gpu", help=f"{InferConfig.model_fields['gpu'].description} "
               f"[$HPCPATH_GPU, else {InferConfig.model_fields['gpu'].default}]")
@config_options(InferConfig, "mixed_precision", "xla")
@click.option("--slides", "slide_dirs", multiple=True, type=click.Path(),
              help="Folders holding the source slides of STORES.")
@click.option("--wait-workers", type=int, default=1, show_default=True,
              help="Start once this many workers are connected (or the cluster's worker_timeout passed).")
@cluster_options(spark=True)
def infer(inputs, model_dir, out_dir, config_file, slide_dirs, wait_workers, cluster, workers, **options):
    """Run a model over SLIDES_OR_STORES: heatmaps into each store's predictions/<name>,
    overlay PNGs, detections (CSV and QuPath GeoJSON) for points models, and run tables.

    Complete slides are skipped on a rerun.  Exit status: 0 when every slide finished, 1 when
    any failed, 2 on usage errors (bad options, model folder, config, output).
    """
    from hpcpath.cluster import parse_cluster_spec
    from hpcpath.gpu import setting_from_env
    from hpcpath.infer.run import check_model
    from hpcpath.workflows import infer_inputs

    options["gpu"] = options.get("gpu") or setting_from_env()
    cfg = InferConfig.load(config_file, **options)
    check_model(model_dir, cfg)
    spec = parse_cluster_spec(cluster)
    with backend_session(spec, workers, out_dir, lock="infer") as client:
        if wait_workers > 1:
            n = client.wait_for_workers(wait_workers, getattr(spec, "worker_timeout", 60))
            if n < wait_workers:
                click.echo(f"hpcpath: warning: {n} of {wait_workers} workers connected; going on", err=True)
        report = _Report()
        # raw slides are tiled first (OUT/stores), then every store is predicted
        result = infer_inputs(list(inputs), model_dir, out_dir, cfg, client=client,
                              slide_dirs=list(slide_dirs), on_event=report)
        report.status()
    done = [r for r in result.rows if r["status"] == "complete"]
    reused = sum(bool(r.get("reused")) for r in done)
    click.echo(
        f"hpcpath: {len(done)} predicted ({reused} already complete), {len(result.failed)} failed; "
        f"{result.windows} windows; summary {result.summary_path}", err=True)
    from hpcpath.cli.report import report_after

    report_after(out_dir)
    if result.failed:
        sys.exit(1)

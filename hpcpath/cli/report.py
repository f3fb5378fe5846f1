"""``hpcpath report``: one self-contained HTML page of a run's outputs (hpcpath.report)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("paths", nargs=-1, required=True, metavar="RUN_OR_OUTPUT_DIR...")
@click.option("-o", "--out", "out", type=click.Path(),
              help="HTML file to write [FIRST_DIR/hpcpath-report.html].")
def report(paths, out):
    """Write one HTML file (images embedded, no external links) showing the tiling, training,
    inference and evaluation outputs found under RUN_OR_OUTPUT_DIR: slides with their tissue
    masks, heatmap overlays with detections, training curves, ROC/FROC plots, metrics,
    per-stage timings and failures."""
    from hpcpath.report import write_report

    path = write_report(list(paths), out)
    click.echo(f"report {path}")


def report_after(out_dir) -> None:
    """The report at the end of tile/infer/evaluate: OUT/hpcpath-report.html; a report that
    cannot be made is a warning, never the stage's failure."""
    from hpcpath.errors import HpcpathError
    from hpcpath.report import write_report

    try:
        path = write_report([out_dir])
    except (HpcpathError, OSError, ValueError, KeyError) as exc:
        click.echo(f"hpcpath: warning: no report ({exc})", err=True)
        return
    click.echo(f"hpcpath: report {Path(path)}", err=True)

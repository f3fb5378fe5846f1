"""Option builders shared by commands, so the same flag means the same thing everywhere."""

from __future__ import annotations

import click


def cluster_options(f):
    f = click.option(
        "--workers", type=int, default=None,
        help="Number of local workers (default: one per core).",
    )(f)
    f = click.option(
        "--cluster", default=None, metavar="local|slurm|FILE.yaml|tcp://ADDR",
        help="Where Dask runs (default: $HPCPATH_CLUSTER or a LocalCluster).",
    )(f)
    return f


def echo_err(message: str) -> None:
    click.echo(message, err=True)

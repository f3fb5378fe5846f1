"""Entry point: a click group whose commands import their heavy dependencies lazily, so
``hpcpath --help`` is instant, and one place that turns HpcpathError into a one-line message
and a non-zero exit instead of a traceback."""

from __future__ import annotations

import os
import sys

import click

from hpcpath._version import __version__
from hpcpath.errors import HpcpathError

EXIT_FAILED = 1  # the run finished but some slide failed (or had nothing to tile)
EXIT_USAGE = 2  # bad arguments, config or output location: nothing ran


def fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"hpcpath: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HpcpathError as exc:
            fail(str(exc))
        except OSError as exc:  # the driver's own write failed (disk full, read-only folder)
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}", EXIT_FAILED)
        except KeyboardInterrupt:
            click.echo("hpcpath: interrupted; partial stores are not marked complete", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcpath")
def cli() -> None:
    """hpcpath: whole-slide images to Zarr stores, models and answers, on Dask and Slurm."""


def _register() -> None:
    from hpcpath.cli import dataset, evaluate, infer, info, report, serve, synth, tile, train

    cli.add_command(tile.tile)
    cli.add_command(dataset.dataset)
    cli.add_command(train.train)
    cli.add_command(train.mine)
    cli.add_command(infer.infer)
    cli.add_command(evaluate.evaluate)
    cli.add_command(synth.synth)
    cli.add_command(info.info)
    cli.add_command(report.report)
    cli.add_command(serve.serve)


_register()


def main(argv: list[str] | None = None) -> None:
    # TensorFlow's C++ start-up banners (CPU features, oneDNN, absl) are not the user's
    # business; errors still print.  Set before anything imports TensorFlow, and inherited
    # by Dask workers and Slurm jobs started from here.  TF_CPP_MIN_LOG_LEVEL=0 brings them back.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cli.main(args=argv, prog_name="hpcpath")


if __name__ == "__main__":
    main()

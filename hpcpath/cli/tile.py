"""``hpcpath tile``: slides or folders -> one Zarr store per slide."""

from __future__ import annotations

import sys

import click

from hpcpath.cli.common import backend_session, cluster_options
from hpcpath.cli.options import config_option, config_options
from hpcpath.config import TileConfig


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="SLIDE_OR_DIR...")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output folder.")
@click.option("--config", "config_file", type=click.Path(),
              help="YAML with tile options (top level or under 'tile:').")
@config_options(TileConfig, "tile_size", "overlap", "level", "mpp", "default_mpp", "tissue_threshold",
                "tissue_method", "codec", "jpeg_quality", "passthrough", "chunk_tiles", "tiles_per_task",
                "pyramid")
@config_option(TileConfig, "pyramid_downsample",
               help="level-0 downsample of the pyramid's finest level [4]; 1 = full resolution "
                    "(napari and other OME-Zarr viewers show the slide pixel for pixel)")
@config_option(TileConfig, "reader")
@config_option(TileConfig, "record_paths", off="--names-only",
               help="slide paths in the manifest [yes]; --names-only keeps file names (later stages then "
                    "need --slides)")
@click.option("--allow-empty", is_flag=True, help="Exit 0 even if some slide had nothing to tile.")
@cluster_options(spark=True)
def tile(inputs, out_dir, config_file, allow_empty, cluster, workers, **options):
    """Tile slides into OUT/<slide_id>.zarr stores (pyramid, tissue mask, tile index, tiles).

    Complete stores are skipped on a rerun; partial ones are redone.  Exit status: 0 when
    every slide was tiled, 1 when any slide failed (or had nothing to tile), 2 on usage errors.
    """
    from hpcpath._malloc import one_arena
    from hpcpath.cli.progress import Progress
    from hpcpath.tiling import tile_slides

    one_arena()  # the workers' malloc setting here too: one slide is tiled in this process
    cfg = TileConfig.load(config_file, **options)
    with backend_session(cluster, workers, out_dir, lock="tile") as client:
        progress = Progress()
        try:
            result = tile_slides(list(inputs), out_dir, cfg, client=client, on_event=progress)
        finally:
            progress.close()
    ok = sum(r.status == "complete" for r in result.records)
    reused = sum(r.reused for r in result.records)
    click.echo(
        f"hpcpath: {ok} tiled ({reused} already complete), {len(result.empty)} empty, "
        f"{len(result.failed)} failed; {result.n_tiles} tiles; manifest {result.manifest_path}",
        err=True,
    )
    from hpcpath.cli.report import report_after

    report_after(out_dir)
    if result.failed or (result.empty and not allow_empty):
        sys.exit(1)

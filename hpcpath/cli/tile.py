"""``hpcpath tile``: slides or folders -> one Zarr store per slide."""

from __future__ import annotations

import sys

import click

from hpcpath.cli.common import backend_session, cluster_options


@click.command()
@click.argument("inputs", nargs=-1, required=True, metavar="SLIDE_OR_DIR...")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output folder.")
@click.option("--config", "config_file", type=click.Path(), help="YAML with tile options (top level or under 'tile:').")
@click.option("--tile-size", type=int, help="Tile edge in pixels [256].")
@click.option("--overlap", type=int, help="Pixels shared by neighbouring tiles [0].")
@click.option("--level", type=int, help="Pyramid level to tile [0].")
@click.option("--mpp", type=float, help="Target microns per pixel (instead of --level).")
@click.option("--default-mpp", type=float, help="MPP to assume for slides without one.")
@click.option("--tissue-threshold", type=float, help="Minimum tissue fraction per tile [0.5].")
@click.option("--tissue-method", type=click.Choice(["saturation", "od"]), help="Tissue detector [saturation].")
@click.option("--codec", type=click.Choice(["blosc-lz4", "blosc-zstd", "jpeg", "none"]), help="Tile array codec [blosc-lz4].")
@click.option("--jpeg-quality", type=int, help="Quality for --codec jpeg [90].")
@click.option("--passthrough", type=click.Choice(["auto", "never"]),
              help="auto: store a JPEG slide's own tiles unchanged where the tile grid is theirs "
                   "(--codec is then ignored); never: always decode and re-encode [auto].")
@click.option("--chunk-tiles", type=int, help="Tiles per Zarr chunk [64].")
@click.option("--tiles-per-task", type=int, help="Tiles per Dask task [256].")
@click.option("--pyramid/--no-pyramid", default=None, help="Write the OME-NGFF overview pyramid [yes].")
@click.option("--pyramid-downsample", type=float,
              help="Level-0 downsample of the pyramid's finest level [4]; 1 = full resolution "
                   "(napari and other OME-Zarr viewers show the slide pixel for pixel).")
@click.option("--reader", type=click.Choice(["auto", "openslide", "direct"]), help="Pixel reader [auto].")
@click.option("--record-paths/--names-only", default=None,
              help="Slide paths in the manifest [yes]; --names-only keeps file names (later stages then need --slides).")
@click.option("--allow-empty", is_flag=True, help="Exit 0 even if some slide had nothing to tile.")
@cluster_options(spark=True)
def tile(inputs, out_dir, config_file, allow_empty, cluster, workers, **options):
    """Tile slides into OUT/<slide_id>.zarr stores (pyramid, tissue mask, tile index, tiles).

    Complete stores are skipped on a rerun; partial ones are redone.  Exit status: 0 when
    every slide was tiled, 1 when any slide failed (or had nothing to tile), 2 on usage errors.
    """
    from hpcpath.cli.progress import Progress
    from hpcpath.config import TileConfig
    from hpcpath.tiling import tile_slides

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

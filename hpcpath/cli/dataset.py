"""``hpcpath dataset``: build labelled patch datasets and describe them."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from hpcpath.cli.common import backend_session, cluster_options, dask_session
from hpcpath.cli.options import config_option, config_options
from hpcpath.config import DatasetConfig


@click.group()
def dataset():
    """Labelled patch datasets from slide stores and annotations."""


@dataset.command("build")
@click.argument("stores", nargs=-1, required=True, metavar="STORE_OR_DIR...")
@click.option("-a", "--annotations", "annotations", multiple=True, type=click.Path(),
              help="Annotation files or folders (masks, ASAP/Aperio XML, GeoJSON, point CSV); "
                   "matched to slides by file name.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Dataset manifest (.json) to write.")
@click.option("--config", "config_file", type=click.Path(),
              help="YAML with dataset options (top level or under 'dataset:').")
@config_options(DatasetConfig, "name", "rule")
@config_option(DatasetConfig, "classes", "--class", "classes")
@click.option("--label", "labels", multiple=True, metavar="OLD=NEW",
              help="Rename an annotation class before labelling (repeatable), e.g. --label Carcinoma=Tumor; "
                   "added to the default CAMELYON map (_0/_1 -> Tumor, _2 -> Exclusion).")
@config_option(DatasetConfig, "exclude_classes", "--exclude", "exclude")
@config_option(DatasetConfig, "centre_fraction")
@config_option(DatasetConfig, "context_downsamples", "--context", "context")
@config_option(DatasetConfig, "jitter_px", "--jitter", "jitter_px")
@config_options(DatasetConfig, "rotations", "negatives_per_slide")
@click.option("--slides", "slide_dirs", multiple=True, type=click.Path(), help="Folders holding the source slides.")
@config_option(DatasetConfig, "seed")
@cluster_options(spark=True)
def build(stores, annotations, out, config_file, name, rule, classes, labels, exclude, centre_fraction,
          context, jitter_px, rotations, negatives_per_slide, slide_dirs, seed, cluster, workers):
    """Label every tile (or point-centred patch) of the STORES and write a dataset manifest."""
    from hpcpath.dataset import build_dataset

    label_map = None
    if labels:
        from hpcpath.errors import ConfigError

        bad = [x for x in labels if x.count("=") != 1 or not all(p.strip() for p in x.split("="))]
        if bad:
            raise ConfigError(f"--label {bad[0]!r}: expected OLD=NEW, e.g. --label Carcinoma=Tumor")
        label_map = {**DatasetConfig.load(config_file).label_map,
                     **dict(tuple(p.strip() for p in x.split("=")) for x in labels)}
    cfg = DatasetConfig.load(
        config_file, name=name, rule=rule, classes=tuple(classes) or None, label_map=label_map,
        exclude_classes=tuple(exclude) or None,
        centre_fraction=centre_fraction, context_downsamples=tuple(context) or None,
        jitter_px=jitter_px, rotations=int(rotations) if rotations else None,
        negatives_per_slide=negatives_per_slide, seed=seed,
    )

    def report(kind, info):
        if kind == "failed":
            click.echo(f"hpcpath: {info['slide_id']}: {info['error']}", err=True)
        elif kind == "warning":
            click.echo(f"hpcpath: warning: {info['warning']}", err=True)

    with backend_session(cluster, workers, Path(out).parent, lock="dataset build",
                      lock_name=f".hpcpath-lock-{Path(out).name}") as client:
        res = build_dataset(list(stores), list(annotations), out, cfg, slide_dirs=list(slide_dirs),
                            client=client, on_event=report)
    click.echo(f"hpcpath: dataset {res.manifest}: {len(res.slides)} slides, {len(res.failed)} failed", err=True)
    _print_info(res.manifest)
    if res.failed:
        sys.exit(1)


@dataset.command("images")
@click.option("--csv", "csv", required=True, type=click.Path(), help="ChestX-ray14-style Data_Entry CSV.")
@click.option("--images", "image_dir", required=True, type=click.Path(), help="Folder with the images.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Output folder.")
@click.option("--name", default="cxr", show_default=True)
@click.option("--size", default=224, show_default=True, help="Images are resized to SIZE x SIZE.")
@click.option("--class", "classes", multiple=True, help="Class list (default: the 14 ChestX-ray14 findings).")
@click.option("--seed", default=0, show_default=True)
@cluster_options
def images(csv, image_dir, out, name, size, classes, seed, cluster, workers):
    """An image folder + multi-label CSV as a dataset, split by patient."""
    from hpcpath.dataset import build_image_dataset

    with dask_session(cluster, workers, out, lock="dataset images") as client:
        path = build_image_dataset(csv, image_dir, out, name=name, classes=classes or None,
                                   size=size, seed=seed, client=client)
    _print_info(path)


@dataset.command("info")
@click.argument("manifest", type=click.Path())
def info(manifest):
    """Items per class and split."""
    _print_info(manifest)


def _print_info(manifest) -> None:
    from hpcpath.dataset import open_dataset

    ds = open_dataset(manifest)
    counts = ds.class_counts()
    cols = list(next(iter(counts.values())).keys())
    click.echo(f"dataset {ds.name}: {len(ds.slide_ids)} slides/stores, {len(ds)} items")
    click.echo(f"{'split':<7}" + "".join(f"{c:>14}" for c in cols))
    for split, row in counts.items():
        click.echo(f"{split:<7}" + "".join(f"{row[c]:>14}" for c in cols))

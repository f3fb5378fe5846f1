"""``hpcpath synth``: synthetic Aperio-style slides with planted ground truth."""

from __future__ import annotations

import click


def _size(value: str) -> tuple[int, int]:
    try:
        w, _, h = value.lower().partition("x")
        return int(w), int(h or w)
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 20000x20000, got {value!r}") from None


@click.command()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Output folder.")
@click.option("-n", "--count", default=4, show_default=True, help="Number of slides.")
@click.option("--size", default="8192x8192", show_default=True, help="Level-0 WIDTHxHEIGHT.")
@click.option("--seed", default=0, show_default=True, help="Seed; slide i uses seed + i.")
@click.option("--mpp", default=0.5, show_default=True, help="Microns per pixel.")
@click.option("--mitoses", default=40, show_default=True, help="Planted mitoses per slide.")
@click.option("--blank", is_flag=True, help="Background only: slides with no tissue.")
@click.option("--preset", type=click.Choice(["easy", "hard"]), default="easy", show_default=True,
              help="easy: obvious tumour (smoke tests); hard: stain variation, tumour close to "
                   "stroma, blur/fold/pen artefacts, mitosis mimics (for measuring models).")
@click.option("--normal", type=click.IntRange(min=0), default=None,
              help="How many of the slides (the last ones) have no tumour. "
                   "[default: 0 for easy, a third for hard]")
def synth(out_dir, count, size, seed, mpp, mitoses, blank, preset, normal):
    """Write slide_000.svs ... with tumour masks, ASAP XML, GeoJSON and mitosis CSVs."""
    from hpcpath.synth import make_cohort

    width, height = _size(size)
    if normal is not None and normal > count:
        raise click.BadParameter(f"{normal} normal slides of {count}", param_hint="--normal")
    truths = make_cohort(
        out_dir, n=count, width=width, height=height, seed=seed, mpp=mpp,
        n_mitoses=mitoses, blank=blank, preset=preset, normal=normal,
    )
    for t in truths:
        extra = (f"  mimics {len(t.mimics)}  artefacts {', '.join(k for k, _ in t.artefacts)}"
                 if t.preset != "easy" else "")
        click.echo(f"{t.slide}  {t.width}x{t.height}  tumour regions {len(t.tumour)}  "
                   f"mitoses {len(t.mitoses)}{extra}")

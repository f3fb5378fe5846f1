"""``hpcpath info``: what a slide or a store holds, without identifying fields."""

from __future__ import annotations

import json

import click


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(paths, as_json):
    """Describe slides (levels, MPP, vendor) or hpcpath stores (tiles, completeness)."""
    from pathlib import Path

    from hpcpath.io import open_slide
    from hpcpath.store import open_store

    out = []
    for p in paths:
        if Path(p).suffix == ".zarr":
            store = open_store(p, require_complete=False)
            meta = store.metadata
            out.append({
                "store": str(p), "complete": store.complete, "tiles": len(store),
                "tile_shape": list(store.tiles.shape[1:]), "codec": store.tiles.attrs.get("codec", meta.tiling.codec),
                "pyramid": [list(a.shape) for a in store.pyramid], "slide": meta.slide.to_dict(),
            })
        else:
            with open_slide(p) as s:
                out.append({"slide": str(p), **s.info.to_dict()})
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for item in out:
        for k, v in item.items():
            click.echo(f"{k:>18}: {v}")
        click.echo("")

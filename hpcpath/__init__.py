"""hpcpath: whole-slide images to chunked Zarr stores, models and answers, at cluster scale.

The library API mirrors the CLI::

    from hpcpath import TileConfig, tile_slides, open_store
    from hpcpath.cluster import cluster_client

    with cluster_client("local") as client:
        result = tile_slides(["slides/"], "out", TileConfig(tile_size=256), client=client)
    store = open_store("out/slide_000.zarr")
    tiles = store.tiles[:64]          # (64, 256, 256, 3) uint8

Heavy modules load on first use, so ``import hpcpath`` and ``hpcpath --help`` stay fast.
"""

from importlib import import_module

from hpcpath._version import __version__
from hpcpath.errors import ConfigError, HpcpathError, NoTissueError, OutputError, SlideError

_LAZY = {
    "TileConfig": "hpcpath.config",
    "tile_slides": "hpcpath.tiling",
    "RunResult": "hpcpath.tiling",
    "open_store": "hpcpath.store",
    "SlideStore": "hpcpath.store",
    "open_slide": "hpcpath.io",
    "Slide": "hpcpath.io",
    "cluster_client": "hpcpath.cluster",
}

__all__ = [
    "__version__",
    "HpcpathError",
    "SlideError",
    "NoTissueError",
    "ConfigError",
    "OutputError",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcpath' has no attribute {name!r}")

"""hpcpath: whole-slide images to chunked Zarr stores, models and answers, at cluster scale."""

from hpcpath._version import __version__
from hpcpath.errors import ConfigError, HpcpathError, NoTissueError, OutputError, SlideError

__all__ = [
    "__version__",
    "HpcpathError",
    "SlideError",
    "NoTissueError",
    "ConfigError",
    "OutputError",
]

"""One exception root for everything hpcpath raises on purpose.

A user mistake (bad path, unreadable slide, typo in a config) is an ``HpcpathError``; the CLI
prints it as one line and exits non-zero, never with a traceback.  Each subclass also inherits
the fitting built-in type so generic ``except ValueError`` code keeps working, and each pickles
cleanly so errors raised on Dask workers reach the driver intact.
"""

from __future__ import annotations

import os

__all__ = [
    "HpcpathError",
    "SlideError",
    "ConfigError",
    "OutputError",
    "NoTissueError",
    "ClusterError",
    "MetricError",
    "AnnotationError",
]


class HpcpathError(Exception):
    """Base class.  ``path`` names the file the error is about, when there is one."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __reduce__(self):  # keep subclass and path across pickling (Dask workers)
        return (type(self), (self.message, self.path))


class SlideError(HpcpathError, ValueError):
    """A slide cannot be opened or read (missing, not a slide, corrupt, too small)."""


class NoTissueError(SlideError):
    """Tissue detection found nothing to tile."""


class ConfigError(HpcpathError, ValueError):
    """A config file or option is invalid."""


class OutputError(HpcpathError, OSError):
    """The output location cannot be written."""


class ClusterError(HpcpathError, RuntimeError):
    """A cluster could not be started or reached (no worker arrived, sbatch failed, ...)."""


class MetricError(HpcpathError, ValueError):
    """Inputs a metric cannot be computed from (one class only, bad shapes, NaN scores, ...)."""


class AnnotationError(HpcpathError, ValueError):
    """An annotation, mask or label file cannot be used as it is (malformed, empty, unknown
    class, no matching slide).  ``str`` is one line: ``FILE: element: reason``."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(" ".join(str(message).split()), None if path is None else str(path))

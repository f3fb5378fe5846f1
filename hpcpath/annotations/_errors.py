"""Helpers every annotation reader uses to fail or warn in one line: ``FILE: element: reason``,
so a user can open the file and find the element.  The error class is
:class:`hpcpath.errors.AnnotationError`."""

from __future__ import annotations

import os
import warnings

from hpcpath.errors import AnnotationError

__all__ = ["AnnotationError", "AnnotationWarning", "fail", "warn", "skip"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class AnnotationWarning(UserWarning):
    """Something was skipped or changed (a line is not an area, a region was clipped)."""


def message(path, element: str | None, reason: str) -> str:
    """``FILE: element: reason`` (or ``FILE: reason`` without an element), on one line."""
    parts = [os.fspath(path)] if path is not None else []
    if element:
        parts.append(element)
    parts.append(reason)
    return _one_line(": ".join(parts))


def fail(path, element: str | None, reason: str) -> AnnotationError:
    """The error to raise for ``element`` of ``path`` (``raise fail(...)``)."""
    return AnnotationError(f"{element}: {reason}" if element else reason, path)


def warn(sink: list[str], path, element: str | None, reason: str) -> None:
    """Record a one-line warning in ``sink`` and issue it as an ``AnnotationWarning``."""
    text = message(path, element, reason)
    sink.append(text)
    warnings.warn(text, AnnotationWarning, stacklevel=3)


def skip(sink: list[str], exc: AnnotationError) -> None:
    """Turn the error of one element (a region, a feature, a row) into a warning: the element
    is skipped and the rest of the file is read -- a file fails only when it cannot be parsed
    at all."""
    text = _one_line(f"{exc}, skipped")
    sink.append(text)
    warnings.warn(text, AnnotationWarning, stacklevel=3)

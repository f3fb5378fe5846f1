"""Files every stage writes or finds: atomic writes, CSV/JSON tables, slide-store discovery.

Every output file is written under a temporary name in its own folder and renamed over the
real name, so a killed run never leaves half a file, and two processes writing the same
file leave one whole copy.  This is the one copy of that rule; stages call it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hpcpath.errors import HpcpathError, OutputError

__all__ = [
    "atomic_path",
    "atomic_file",
    "write_atomic",
    "write_text",
    "write_json",
    "write_table",
    "read_table",
    "find_stores",
]


def atomic_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A temporary name beside ``path`` (hidden, per process) to write before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")


_ERROR = "cannot write ({reason})"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "", error: str = _ERROR) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write (by any library); on success it is
    renamed over ``path``, on any failure removed.  An OSError becomes one OutputError line,
    ``error`` formatted with the reason."""
    path = Path(path)
    tmp = atomic_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(error.format(reason=exc.strerror or exc), path) from None
    finally:  # best effort: on a folder turned read-only even the clean-up fails
        if tmp.is_dir() and not tmp.is_symlink():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: bytes, error: str = _ERROR) -> Path:
    """Write ``data`` to ``path`` all at once (temporary file, then rename)."""
    with atomic_file(path, error=error) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, error: str = _ERROR) -> Path:
    return write_atomic(path, text.encode("utf-8"), error)


def write_json(path: str | os.PathLike, doc: Any, indent: int = 2, error: str = _ERROR, **kw: Any) -> Path:
    """``doc`` as JSON (with a final newline), atomically: manifests, run records."""
    return write_text(path, json.dumps(doc, indent=indent, **kw) + "\n", error)


def _cell(v: Any) -> str:
    import math

    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return str(v)


def write_table(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    """A CSV table with ``columns`` (missing values empty, floats to 6 digits), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in columns])
    return write_atomic(path, buf.getvalue().encode())


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """A CSV table as rows of strings; a missing file is an empty table."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def find_stores(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Slide stores named directly or found (one level deep) in folders."""
    out: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.suffix == ".zarr":
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(c for c in p.iterdir() if c.suffix == ".zarr" and c.is_dir()))
        else:
            raise HpcpathError("not a slide store (.zarr) or a folder of them", p)
    return out

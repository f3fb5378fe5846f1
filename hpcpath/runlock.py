"""One run per output folder: a lock file that a second run is refused on, in one line naming
the first, and that a killed run does not leave stuck.

The lock is ``OUT/.hpcpath-lock``, created with ``O_CREAT | O_EXCL`` (atomic on local disks
and on NFSv3+ / Lustre / GPFS, which several nodes may share).  It holds the owner's host,
pid, command and start time, and its modification time is a heartbeat the owner refreshes
every :data:`HEARTBEAT` seconds.  A lock is *stale*, and is taken over, when its owner is on
this host and its pid is gone (or is another program), or - for an owner on another host,
whose pid cannot be checked from here - when its heartbeat is older than :data:`STALE_AFTER`.

Re-entrant within a process: the CLI takes the lock before it starts a cluster and the
library stage takes it again; the file goes when the outermost holder leaves.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcpath.errors import OutputError

__all__ = ["LOCK_NAME", "RunLockedError", "run_lock"]

LOCK_NAME = ".hpcpath-lock"
HEARTBEAT = 30.0
STALE_AFTER = 600.0

_held: dict[Path, int] = {}
_guard = threading.Lock()


class RunLockedError(OutputError):
    """Another hpcpath run holds the output folder."""


def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a reused pid of another program is not the owner
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"python" in cmd or b"hpcpath" in cmd
    except OSError:
        return True


def _owner(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        info["age"] = time.time() - path.stat().st_mtime
        return info
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written, or garbage: judge by age alone
        try:
            return {"age": time.time() - path.stat().st_mtime}
        except FileNotFoundError:
            return None


def is_stale(owner: dict, *, host: str | None = None, now_age: float | None = None) -> bool:
    """Whether a lock held by ``owner`` may be taken over (pure but for the pid check).

    >>> is_stale({"host": "elsewhere", "pid": 1, "age": 5.0}, host="here")
    False
    >>> is_stale({"host": "elsewhere", "pid": 1, "age": 3600.0}, host="here")
    True
    """
    host = host or _host()
    age = owner.get("age", 0.0) if now_age is None else now_age
    if owner.get("host") == host and isinstance(owner.get("pid"), int):
        return not _alive(owner["pid"])
    return age > STALE_AFTER


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return (f"{owner.get('command', 'another hpcpath run')} (pid {owner.get('pid', '?')} on "
            f"{owner.get('host', '?')}, started {when})")


@contextmanager
def run_lock(out_dir: str | os.PathLike[str], command: str | None = None,
             name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``out_dir``'s lock (the file ``name`` there) for the duration;
    :class:`RunLockedError` if a live run has it."""
    out = Path(out_dir).resolve()
    path = out / name
    with _guard:
        if _held.get(path):
            _held[path] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _guard:
                _held[path] -= 1
        return
    _acquire(path, command or _command())
    with _guard:
        _held[path] = 1
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True,
                            name="hpcpath-lock-heartbeat")
    beat.start()
    try:
        yield path
    finally:
        stop.set()
        beat.join(timeout=5)
        with _guard:
            _held.pop(path, None)
        try:
            owner = _owner(path)
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == _host():
                path.unlink()
        except OSError:
            pass


def _acquire(path: Path, command: str) -> None:
    info = {"host": _host(), "pid": os.getpid(), "command": command, "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is None:
                continue  # released meanwhile
            if not is_stale(owner):
                raise RunLockedError(
                    f"in use by {_describe(owner)}; wait for it to finish, or delete "
                    f"{path.name} there if that run is gone", str(path.parent)) from None
            try:  # a dead run's lock: take it over (a rename is atomic; unlink + retry races)
                stale = path.with_name(f"{path.name}.stale-{os.getpid()}")
                os.rename(path, stale)
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        except FileNotFoundError:
            raise OutputError("output folder does not exist", str(path.parent)) from None
        except OSError as exc:
            raise OutputError(f"cannot lock the output folder ({exc.strerror or exc})",
                              str(path.parent)) from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return
    raise RunLockedError("another run keeps taking the output folder's lock", str(path.parent))


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            os.utime(path)
        except OSError:
            return


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:2]] if sys.argv else ["python"]
    if argv[0] in ("__main__.py", "main.py", "-m", "-c"):
        argv[0] = "hpcpath"
    return " ".join(a for a in argv if a)

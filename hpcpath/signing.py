"""Signed pickles: hpcpath unpickles only files it wrote itself.

Unpickling runs code named by the file, so a pickle someone else handed over (or edited) must
never be loaded.  Where a pickle is the only sensible format (a fitted scikit-learn
estimator), hpcpath writes ``MAGIC + HMAC-SHA256(key, payload) + payload`` and checks the
HMAC before ``pickle.loads`` sees a byte.  The key is a random 32-byte file made on first use,
readable by its owner only: ``$HPCPATH_SIGNING_KEY`` or ``~/.config/hpcpath/signing.key``
(a home folder shared across a cluster's nodes shares the key with them).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

from hpcpath.errors import HpcpathError

__all__ = ["MAGIC", "dumps", "loads", "key_path"]

MAGIC = b"hpcpath-signed-pickle/1\n"
_DIGEST = 32


def key_path() -> Path:
    env = os.environ.get("HPCPATH_SIGNING_KEY")
    return Path(env) if env else Path.home() / ".config" / "hpcpath" / "signing.key"


def _key() -> bytes:
    path = key_path()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path.read_bytes()


def dumps(obj: Any) -> bytes:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + hmac.new(_key(), payload, hashlib.sha256).digest() + payload


def loads(data: bytes, path: str | os.PathLike[str]) -> Any:
    """The object, only if ``data`` carries this key's signature; one-line errors otherwise."""
    if not data.startswith(MAGIC):
        raise HpcpathError("not signed by hpcpath: refusing to unpickle a file hpcpath did not "
                           "write", path)
    sig = data[len(MAGIC):len(MAGIC) + _DIGEST]
    payload = data[len(MAGIC) + _DIGEST:]
    if not hmac.compare_digest(sig, hmac.new(_key(), payload, hashlib.sha256).digest()):
        raise HpcpathError(f"signature does not match (changed since hpcpath wrote it, or "
                           f"written with another key than {key_path()}): not loaded", path)
    return pickle.loads(payload)  # noqa: S301 - verified: written by hpcpath with this key

"""TLS for Dask's scheduler, workers and client, from a cluster spec's ``tls`` fields.

Off by default (all three on loopback for a LocalCluster; on a Slurm cluster, traffic stays
inside the cluster's network).  ``tls: true`` encrypts and authenticates every connection:
with PEM files named in the spec (one CA, one certificate and key shared by all roles), or
with certificates generated for the run (``Security.temporary()``; dask-jobqueue hands them
to the worker jobs as files in the job folder, readable by the user only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpcpath.errors import ConfigError

if TYPE_CHECKING:
    from distributed.security import Security

__all__ = ["cluster_security"]


def cluster_security(spec: Any) -> Security | None:
    """distributed's ``Security`` for ``spec``, or None where TLS is off."""
    if not getattr(spec, "tls", False):
        return None
    try:
        from distributed.security import Security
    except ImportError:  # pragma: no cover - distributed is a dependency
        raise ConfigError("tls: distributed is not installed") from None
    if spec.tls_cert:
        ca, cert, key = spec.tls_ca_file, spec.tls_cert, spec.tls_key
        return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key,
                        tls_scheduler_cert=cert, tls_scheduler_key=key,
                        tls_worker_cert=cert, tls_worker_key=key, require_encryption=True)
    if spec.backend == "scheduler":
        raise ConfigError("tls: a running scheduler needs tls_ca_file, tls_cert and tls_key "
                          "(generated certificates exist only for clusters hpcpath starts)")
    try:
        return Security.temporary()
    except ImportError:
        raise ConfigError("tls: true needs the cryptography package (pip install cryptography)") from None

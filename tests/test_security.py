"""Nothing from a model folder or a saved classifier runs as code: a Keras file with a Lambda
layer is refused (safe mode) and a pickle hpcpath did not write, or one changed since, is
refused before it is unpickled - each in one line.  The dashboard and scheduler stay on
loopback unless configured."""

from __future__ import annotations

import os
import pickle

import pytest

from hpcpath import signing
from hpcpath.errors import HpcpathError


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile pickle would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def _own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCPATH_SIGNING_KEY", str(tmp_path / "signing.key"))


def test_a_pickle_hpcpath_did_not_write_is_refused_unread(tmp_path):
    from hpcpath.evaluate.slides import load_classifier

    marker = tmp_path / "ran"
    hostile = tmp_path / "slide_classifier.pkl"
    hostile.write_bytes(pickle.dumps({"format": "x", "estimator": _Payload(str(marker))}))
    with pytest.raises(HpcpathError) as info:
        load_classifier(hostile)
    assert str(info.value) == f"{hostile}: not signed by hpcpath: refusing to unpickle a file hpcpath did not write"
    assert not marker.exists()
    pickle.loads(hostile.read_bytes())  # the file is really hostile: a plain load runs it
    assert marker.exists()


def test_a_tampered_signed_pickle_is_refused(tmp_path):
    from hpcpath.evaluate.slides import load_classifier

    marker = tmp_path / "ran"
    path = tmp_path / "c.pkl"
    data = signing.dumps({"format": "hpcpath-slide-classifier/1", "estimator": [1, 2, 3]})
    assert signing.loads(data, path)["estimator"] == [1, 2, 3]
    # the payload swapped for a hostile one, signature kept
    evil = pickle.dumps({"estimator": _Payload(str(marker))})
    path.write_bytes(data[:len(signing.MAGIC) + 32] + evil)
    with pytest.raises(HpcpathError, match="signature does not match") as info:
        load_classifier(path)
    assert "\n" not in str(info.value) and not marker.exists()
    # one flipped byte
    flipped = bytearray(data)
    flipped[-5] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(HpcpathError, match="signature does not match"):
        load_classifier(path)
    # another user's key: refused too
    os.environ["HPCPATH_SIGNING_KEY"] = str(tmp_path / "other.key")
    path.write_bytes(data)
    with pytest.raises(HpcpathError, match="signature does not match"):
        signing.loads(data, path)
    assert oct((tmp_path / "signing.key").stat().st_mode & 0o777) == "0o600"


def test_a_model_folder_with_a_lambda_layer_is_refused_without_running_it(tmp_path):
    import keras

    from hpcpath.modelio import ModelMeta, load_model, save_model

    marker = tmp_path / "ran"
    code = f"lambda x: (open({str(marker)!r}, 'w').close(), x)[1]"
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Dense(1)(keras.layers.Lambda(eval(code))(inp))  # noqa: S307
    save_model(keras.Model(inp, out), tmp_path / "model", ModelMeta(patch_size=8))
    marker.unlink()  # called once while building
    with pytest.raises(HpcpathError) as info:
        load_model(tmp_path / "model")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'model' / 'model.keras'}: cannot load model")
    assert "lambda" in msg.lower() and not marker.exists()
    # the folder really carries code: Keras with safe mode off runs it
    keras.saving.load_model(tmp_path / "model" / "model.keras", safe_mode=False)
    assert marker.exists()


def test_dashboard_and_scheduler_on_loopback_by_default(dask_client):
    from urllib.parse import urlsplit

    from hpcpath.cluster.spec import LocalSpec

    assert LocalSpec().dashboard_address.startswith("127.0.0.1:")
    assert urlsplit(dask_client.scheduler.address).hostname == "127.0.0.1"
    info = dask_client.scheduler_info()
    assert all(urlsplit(w).hostname == "127.0.0.1" for w in info["workers"])
    assert urlsplit(dask_client.dashboard_link).hostname == "127.0.0.1"


# ------------------------------------------------------------------ TLS
def _tls_round_trip(client) -> None:
    """Every address is tls://, work runs on the workers, and a plain TCP client is refused."""
    from distributed import Client

    assert client.scheduler.address.startswith("tls://")
    workers = client.scheduler_info()["workers"]
    assert workers and all(w.startswith("tls://") for w in workers)
    assert client.submit(sum, [1, 2, 3], pure=False).result(timeout=60) == 6
    assert all(client.run(lambda: 1).values())
    plain = client.scheduler.address.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout=3)


def test_tls_on_a_local_cluster_with_generated_certificates():
    from hpcpath.cluster import cluster_client

    with cluster_client({"backend": "local", "n_workers": 1, "tls": True}) as client:
        _tls_round_trip(client)


def _openssl_certs(d) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it (openssl, as a site would)."""
    import subprocess

    def ssl(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=hpcpath-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "node.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"tls_ca_file": str(d / "ca.pem"), "tls_cert": str(d / "node.pem"), "tls_key": str(d / "node.key")}


def test_tls_with_site_certificate_files_and_spec_errors(tmp_path):
    from hpcpath.cluster import cluster_client, parse_cluster_spec
    from hpcpath.errors import ConfigError

    files = _openssl_certs(tmp_path)
    with cluster_client({"backend": "local", "n_workers": 1, "tls": True, **files}) as client:
        _tls_round_trip(client)
    for bad, why in [({"tls": True, "tls_cert": files["tls_cert"]}, "need all of"),
                     ({**files}, "tls is false"),
                     ({"tls": True, **files, "tls_key": str(tmp_path / "nope.key")}, "no such file"),
                     ({"tls": "maybe"}, "tls")]:
        with pytest.raises(ConfigError, match=why) as info:
            parse_cluster_spec({"backend": "local", **bad})
        assert "\n" not in str(info.value)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tls_on_the_local_slurm(local_slurm, tmp_path):
    """dask-jobqueue SLURMCluster with generated certificates: the worker job gets them as
    files in the job folder and joins over tls://."""
    from hpcpath.cluster import cluster_client

    spec = {"backend": "slurm", "memory": "1GB", "walltime": "00:05:00", "tls": True,
            "log_directory": str(tmp_path), "worker_timeout": 90}
    with cluster_client(spec) as client:
        _tls_round_trip(client)
        ids = {str(job.job_id) for job in client.cluster.workers.values()}
        assert ids and all(ids)
        script = client.cluster.job_script()
        assert "--tls-ca-file" in script
        keys = [p for p in tmp_path.iterdir() if p.suffix == ".pem" or "key" in p.name]
        assert all(p.stat().st_mode & 0o077 == 0 for p in keys)  # the user's only

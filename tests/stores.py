"""pytest plugin: real GCS and Azure Blob emulators on 127.0.0.1 for the session, each behind the
counting, fault-injecting proxy of tests/faults.py, and a `store` fixture that gives a fresh
bucket on S3 (tests/s3.py), GCS or Azure with one shape, so that one test runs on all three.

- gs://: gcp-storage-emulator (PyPI), in this process. Workers reach it through
  STORAGE_EMULATOR_HOST, the variable Google's own clients read (launcher.storage then uses
  anonymous credentials). The emulator ignores `ifGenerationMatch`; `_enforce_generation_match`
  adds the one precondition the claim protocol sends (`ifGenerationMatch=0`: create only if
  absent, else 412), checked inside the emulator's single request thread, as GCS documents it.
- az://: Azurite (npm), a child process, found at $DREAMFLEET_AZURITE, else
  .cache/azurite/node_modules/.bin/azurite-blob (`make system-deps` installs it there), else on
  PATH. Its account key is random per session; workers get it in
  AZURE_STORAGE_CONNECTION_STRING, the variable adlfs reads.

A missing emulator skips the test, which fails it under CI=true (tests/conftest.py).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from faults import Proxy

REPO = Path(__file__).resolve().parent.parent
# gcsfs's default class asks the GCS control plane over gRPC (TLS, to the real Google endpoint)
# whether a bucket is zonal, which an emulator cannot answer: the plain class talks JSON only.
# Read when gcsfs is imported, so set here, before any test imports it.
GCS_EMULATOR_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
os.environ.update(GCS_EMULATOR_ENV)
STORES = ("s3", "gs", "az")
AZ_ACCOUNT = "dreamfleettest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the emulator exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


# ------------------------------------------------------------------ GCS


def _enforce_generation_match() -> None:
    """Make the emulator answer 412 to an insert with ifGenerationMatch=0 when the object exists."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = getattr(objects.insert, "__wrapped__", objects.insert)

    def insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            data = request.data if isinstance(request.data, dict) else {}
            name = (request.query.get("name") or [None])[0] or (data.get("meta") or data).get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})
                return None
            except NotFound:
                pass
        return original(request, response, storage, *args, **kwargs)

    insert.__wrapped__ = original
    objects.insert = insert
    server.HANDLERS = tuple((regex, {m: insert if h is original else h for m, h in handlers.items()})
                           for regex, handlers in server.HANDLERS)


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator (in memory) on 127.0.0.1; yields the proxy in front of it."""
    try:
        from gcp_storage_emulator.server import create_server
    except ImportError:
        pytest.skip("needs gcp-storage-emulator (pip install -c constraints.txt -e '.[test]')")
    _enforce_generation_match()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    proxy = Proxy(port)
    yield proxy
    proxy.close()
    server.stop()


# ------------------------------------------------------------------ Azure


def azurite_binary() -> str | None:
    candidates = [os.environ.get("DREAMFLEET_AZURITE"), str(REPO / ".cache/azurite/node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory):
    """Azurite's blob service on 127.0.0.1 with a random account key; yields (proxy, key)."""
    binary = azurite_binary()
    if binary is None or shutil.which("node") is None:
        pytest.skip("needs Node and Azurite (make system-deps installs them as root)")
    key = base64.b64encode(secrets.token_bytes(64)).decode()
    port = free_port()
    work = tmp_path_factory.mktemp("azurite")
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{AZ_ACCOUNT}:{key}"}
    proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--skipApiVersionCheck", "--loose", "--silent"],
                            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(port, 60, proc)
    except RuntimeError as exc:
        proc.kill()
        pytest.fail(f"Azurite did not start: {exc}: {proc.stderr.read().decode()[-2000:]}")
    proxy = Proxy(port)
    yield proxy, key
    proxy.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def azure_connection_string(url: str, key: str) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={url}/{AZ_ACCOUNT};")


# ------------------------------------------------------------------ one fixture, three stores


def fs_for(store: dict):
    """A filesystem of the store's kind that talks to the test's bucket through the proxy
    (paths are "bucket/key" on all three)."""
    env = store["env"]
    if store["scheme"] == "s3":
        import s3fs

        return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                                 client_kwargs={"endpoint_url": store["proxy"].url, "region_name": "us-east-1"},
                                 skip_instance_cache=True, use_listings_cache=False)
    if store["scheme"] == "gs":
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=store["proxy"].url, token="anon", project="test",
                                   skip_instance_cache=True, use_listings_cache=False)
    import adlfs

    return adlfs.AzureBlobFileSystem(connection_string=env["AZURE_STORAGE_CONNECTION_STRING"],
                                     skip_instance_cache=True, use_listings_cache=False)


def _fresh(request, scheme: str, monkeypatch) -> dict:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    if scheme == "s3":
        s3 = request.getfixturevalue("s3")
        return {**s3, "scheme": "s3", "uri": f"s3://{s3['bucket']}"}
    if scheme == "gs":
        proxy = request.getfixturevalue("gcs_server")
        env = {"STORAGE_EMULATOR_HOST": proxy.url, **GCS_EMULATOR_ENV}
    else:
        proxy, key = request.getfixturevalue("azurite_server")
        env = {"AZURE_STORAGE_CONNECTION_STRING": azure_connection_string(proxy.url, key)}
    env["DREAMFLEET_STORAGE_BACKOFF_S"] = "0.05"
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    proxy.reset()
    store = {"bucket": bucket, "env": env, "proxy": proxy, "scheme": scheme, "uri": f"{scheme}://{bucket}"}
    fs_for(store).mkdir(bucket)
    proxy.requests.clear()
    return store


@pytest.fixture(params=STORES)
def store(request, monkeypatch):
    """A fresh bucket on each of S3, GCS and Azure in turn: a dict with "scheme", "bucket",
    "uri" (scheme://bucket), "env" (for workers; also set in this process), "proxy"."""
    fresh = _fresh(request, request.param, monkeypatch)
    yield fresh
    fresh["proxy"].reset()


def object_reads(store: dict, key: str) -> int:
    """GETs of object contents (not listings or metadata) under bucket/key, on any store."""
    from urllib.parse import unquote

    proxy, bucket = store["proxy"], store["bucket"]
    with proxy.lock:
        paths = [unquote(p) for m, p in proxy.requests if m == "GET"]
    if store["scheme"] == "gs":
        return sum(p.startswith(f"/download/storage/v1/b/{bucket}/o/{key}") for p in paths)
    prefix = f"/{bucket}/{key}" if store["scheme"] == "s3" else f"/{AZ_ACCOUNT}/{bucket}/{key}"
    return sum(p.startswith(prefix) and "comp=" not in p and "list-type" not in p for p in paths)

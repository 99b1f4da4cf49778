"""pytest plugin: a real S3 endpoint (moto's server) on 127.0.0.1 for the session, behind the
counting, fault-injecting proxy of tests/faults.py. Workers reach S3 through the proxy by
DREAMFLEET_S3_ENDPOINT.

Fixtures: `s3_server` (the session's Proxy: .url, .faults, .count(), .requests) and `s3` /
`s3_bucket` (a fresh bucket; a dict with "bucket", "env" (endpoint and throwaway credentials,
also set in this process), "proxy").
"""

from __future__ import annotations

import socket
import uuid

import pytest

from faults import Proxy

pytest_plugins = ["stores"]  # the GCS and Azure emulators and the `store` fixture over all three
FAKE_KEY_ID = "testing-key-id"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 for the whole session; yields the proxy in front of it."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = Proxy(port)
    yield proxy
    proxy.close()
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket behind the proxy; the environment (in this process and for workers)
    points s3:// at it with throwaway credentials."""
    import boto3

    s3_server.reset()
    env = {"DREAMFLEET_S3_ENDPOINT": s3_server.url, "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
           "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "DREAMFLEET_STORAGE_BACKOFF_S": "0.05"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield {"bucket": bucket, "env": env, "proxy": s3_server}
    s3_server.reset()


@pytest.fixture
def s3_bucket(s3):
    """The same fresh bucket as `s3`, under the name other suites use."""
    return s3

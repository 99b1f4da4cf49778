"""pytest plugin: a real S3 endpoint (moto's server) on 127.0.0.1 for the session, and a
loopback proxy in front of it that counts requests and injects faults: 503 answers, reset
connections, or stalled uploads. Workers reach S3 through the proxy by DREAMFLEET_S3_ENDPOINT.
"""

from __future__ import annotations

import http.client
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

FAKE_KEY_ID = "testing-key-id"


@dataclass
class Faults:
    fail_503: int = 0  # the next N requests answer 503 SlowDown
    reset: int = 0  # the next N requests have their connection closed without an answer
    stall_put_containing: str | None = None  # PUTs whose path contains this hang until released
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Proxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                    f = proxy.faults
                    if f.reset > 0:
                        f.reset -= 1
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    fail = f.fail_503 > 0
                    if fail:
                        f.fail_503 -= 1
                    stall = self.command == "PUT" and f.stall_put_containing and f.stall_put_containing in self.path
                if fail:
                    payload = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if stall:
                    proxy.faults.stalled.set()
                    proxy.faults.release.wait(timeout=300)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # a HEAD answer has no body but carries the object's length
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.faults.release.set()
            self.faults = Faults()
            self.requests.clear()

    def count(self, method: str, containing: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and containing in p)

    def close(self) -> None:
        self.faults.release.set()
        self.server.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """(moto server, proxy) on 127.0.0.1 for the whole session."""
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

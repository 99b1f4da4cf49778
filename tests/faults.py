"""A loopback HTTP proxy for tests that counts requests and injects bounded faults in front of a
real server (tests/s3.py puts it before moto's S3): the next N requests answer 503 SlowDown, the
next N have their connection reset without an answer, or PUTs to a matching path stall until
released (at most 300 s); for GCS, POSTs whose upload body names a matching object. It also keeps the most requests it has had in flight at once
(`peak_in_flight`), which shows whether a client reads concurrently. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALL_LIMIT_S = 300


@dataclass
class Faults:
    fail_503: int = 0  # the next N requests answer 503 SlowDown
    reset: int = 0  # the next N requests have their connection closed without an answer
    stall_put_containing: str | None = None  # uploads (PUT path, GCS POST body) naming this hang until released
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)


class Proxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.peak_in_flight = max(proxy.peak_in_flight, proxy.in_flight)
                try:
                    self._answer()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def _answer(self):
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
                    # GCS names the object in a POST's body (a multipart upload), S3 and Azure in a PUT's path
                    needle = f.stall_put_containing
                    stall = bool(needle) and ((self.command == "PUT" and needle in self.path) or (
                        self.command == "POST" and body is not None and needle.encode() in body[:65536]))
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
                    proxy.faults.release.wait(timeout=STALL_LIMIT_S)
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
                    try:
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):  # the client gave up (its time-out)
                        self.close_connection = True
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
            self.peak_in_flight = 0

    def count(self, method: str, containing: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and containing in p)

    def close(self) -> None:
        self.faults.release.set()
        self.server.shutdown()

"""A loopback HTTP reverse proxy that injects S3 faults: answers 500/503 or resets the connection mid-request.

    with FaultyProxy("http://127.0.0.1:5000", fail_first=2, mode="reset", methods={"PUT"}) as proxy:
        storage = Storage(StorageConfig("s3://bucket/x", endpoint_url=proxy.url))
        ...
    assert proxy.failures == 2

Requests are forwarded verbatim (Host header included, so SigV4 signatures made for the proxy stay valid) to the
upstream endpoint, one upstream connection per request. Only requests that match `methods` and `path_contains` are
candidates for failure; the first `fail_first` of them fail.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import urlsplit

# Connection-scoped headers are not forwarded (RFC 9110 §7.6.1); the body is re-sent with a Content-Length.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
_S3_CODES = {500: "InternalError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}


@dataclass
class SeenRequest:
    method: str
    path: str
    outcome: str  # "forwarded", "status:503" or "reset"


class FaultyProxy:
    """Threaded reverse proxy to `upstream` that fails the first `fail_first` matching requests.

    mode="status" answers `status` with an S3 XML error body; mode="reset" reads the headers and part of the body,
    then closes the socket with an RST (the client sees "connection reset" mid-request).
    `methods` (e.g. {"PUT", "POST"} for uploads) and `path_contains` narrow which requests may fail.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail_first: int = 0,
        mode: Literal["status", "reset"] = "status",
        status: int = 503,
        methods: Iterable[str] | None = None,
        path_contains: str | None = None,
    ):
        if mode not in ("status", "reset"):
            raise ValueError(f"mode must be 'status' or 'reset', got {mode!r}")
        up = urlsplit(upstream)
        self._upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.fail_first = fail_first
        self.mode = mode
        self.status = status
        self.methods = {m.upper() for m in methods} if methods is not None else None
        self.path_contains = path_contains
        self.seen: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._matched = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        """Requests received so far, failed or not."""
        return len(self.seen)

    @property
    def failures(self) -> int:
        """Requests failed on purpose so far."""
        return sum(r.outcome != "forwarded" for r in self.seen)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _should_fail(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_contains is not None and self.path_contains not in path:
            return False
        with self._lock:
            self._matched += 1
            return self._matched <= self.fail_first

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.seen.append(SeenRequest(method, path, outcome))

    def start(self) -> FaultyProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, format: str, *args: object) -> None:  # quiet test output
                pass

            def _read_body(self, limit: int | None = None) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                                pass
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length if limit is None else min(length, limit))

            def _handle(self) -> None:
                method, path = self.command, self.path
                if proxy._should_fail(method, path):
                    if proxy.mode == "reset":
                        self._read_body(limit=1024)  # mid-request: part of the body has been sent
                        # SO_LINGER 0 makes close() send an RST instead of a clean FIN.
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        self.connection.close()
                        self.close_connection = True
                        proxy._record(method, path, "reset")
                        return
                    self._read_body()  # drain, or the leftover body would be parsed as the next request
                    code = _S3_CODES.get(proxy.status, "InjectedFault")
                    body = (
                        b""
                        if method == "HEAD"
                        else (
                            f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>injected by FaultyProxy</Message></Error>"
                        ).encode()
                    )
                    self.send_response_only(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    proxy._record(method, path, f"status:{proxy.status}")
                    return

                body = self._read_body()
                conn = http.client.HTTPConnection(*proxy._upstream, timeout=60)
                try:
                    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            conn.putheader(name, value)
                    if body or method in ("PUT", "POST"):
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body or None)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response_only(resp.status, resp.reason)
                    for name, value in resp.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    # HEAD carries the object's length without a body.
                    length = resp.getheader("Content-Length", "0") if method == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                proxy._record(method, path, "forwarded")

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faulty-proxy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Test helper for storage faults: an HTTP proxy on 127.0.0.1 between the pipeline's S3 clients and the moto server.

Every ``every``-th eligible request gets a fault instead of an answer, cycling through ``kinds``:
``slowdown`` (503 SlowDown XML), ``internal`` (500 InternalError XML) or ``reset`` (the TCP connection is reset
before any response byte). Injection is bounded: after ``max_faults`` faults the proxy forwards everything, so a
client with enough retries always gets through. Faulted requests are never forwarded (a reset PUT did not happen).

Also, for targeted tests: ``persistent`` (path substring -> kind) faults every matching request forever (an object
that stays broken); ``hold`` parks matching requests until ``release()`` and ``delay_s`` slows them down (a job that
cannot finish before the test has acted); ``on_request`` runs before each request is handled (e.g. to delete an
object after listing); ``writes`` records every PUT/POST/DELETE path the clients sent.

    with FaultProxy(local_s3.endpoint_url, every=4) as proxy:
        cfg = StorageConfig(endpoint_url=proxy.endpoint_url)
"""

from __future__ import annotations

import http.client
import logging
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["FaultProxy", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("slowdown", "internal", "reset")
_ERRORS = {
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "notfound": (404, "Not Found", "NoSuchKey", "The specified key does not exist."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


class FaultProxy:
    """A threaded forwarding proxy to ``upstream`` (``http://127.0.0.1:PORT``) that injects S3 faults."""

    def __init__(
        self,
        upstream: str,
        *,
        every: int = 0,
        kinds: tuple[str, ...] = KINDS,
        max_faults: int = 1000,
        eligible: Callable[[str, str], bool] | None = None,
        persistent: dict[str, str] | None = None,
        hold: Callable[[str, str], bool] | None = None,
        hold_timeout_s: float = 120.0,
        delay_s: Callable[[str, str], float] | None = None,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        unknown = set(kinds) - set(KINDS) | set((persistent or {}).values()) - {*KINDS, "notfound"}
        if unknown:
            raise ValueError(
                f"fault kinds must be in {KINDS} (+ 'notfound' for persistent), got {sorted(unknown)}"
            )
        if every < 0 or max_faults < 0:
            raise ValueError(f"every and max_faults must be >= 0, got {every} and {max_faults}")
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.every, self.kinds, self.max_faults = every, kinds, max_faults
        self.eligible = eligible
        self.persistent = dict(persistent or {})
        self.hold, self.hold_timeout_s = hold, hold_timeout_s
        self.delay_s = delay_s
        self.on_request = on_request
        self.injected: Counter = Counter()  # kind -> count of bounded (retryable) faults
        self.persistent_injected: Counter = Counter()
        self.requests = 0
        self.forwarded = 0
        self.held = 0
        self.writes: list[tuple[str, str]] = []  # (method, unquoted path) of every mutating request
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._eligible_seen = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def release(self) -> None:
        """Let held requests (and all later ones) through."""
        self._released.set()

    def start(self) -> FaultProxy:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        server.handle_error = lambda request, address: log.debug("faultproxy: client %s went away", address)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _decide(self, method: str, path: str) -> str | None:
        """The fault for this request, or None to forward it."""
        with self._lock:
            self.requests += 1
            if method in ("PUT", "POST", "DELETE"):
                self.writes.append((method, path))
            for needle, kind in self.persistent.items():
                if needle in path:
                    self.persistent_injected[kind] += 1
                    return kind
            if not self.every or (self.eligible is not None and not self.eligible(method, path)):
                return None
            self._eligible_seen += 1
            if self._eligible_seen % self.every or self.total_injected >= self.max_faults:
                return None
            kind = self.kinds[self.total_injected % len(self.kinds)]
            self.injected[kind] += 1
            return kind


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for the SDKs' large PUTs
    timeout = 30  # an idle keep-alive connection's thread ends by itself

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        log.debug("faultproxy: " + format, *args)

    def _read_body(self) -> bytes:
        """The request body exactly as sent (chunked framing kept, so it is forwarded byte for byte)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = bytearray()
            while True:
                line = self.rfile.readline()
                raw += line
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers (aws-chunked checksums) end with an empty line
                        trailer = self.rfile.readline()
                        raw += trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += self.rfile.read(size + 2)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        body = self._read_body()
        if proxy.on_request is not None:
            proxy.on_request(self.command, path)
        if proxy.hold is not None and not proxy._released.is_set() and proxy.hold(self.command, path):
            with proxy._lock:
                proxy.held += 1
            proxy._released.wait(proxy.hold_timeout_s)
        if proxy.delay_s is not None and (pause := proxy.delay_s(self.command, path)) > 0:
            time.sleep(pause)
        kind = proxy._decide(self.command, path)
        if kind == "reset":
            # SO_LINGER 0: close() sends RST, the client sees "connection reset" with no response.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if kind is not None:
            self._send_error_xml(*_ERRORS[kind])
            return
        self._forward(body)
        with proxy._lock:
            proxy.forwarded += 1

    def _send_error_xml(self, status: int, reason: str, code: str, message: str) -> None:
        data = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> None:
        host, port = self.server.proxy.upstream  # type: ignore[attr-defined]
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP - {"transfer-encoding"}:
                    conn.putheader(name, value)
            conn.putheader("Connection", "close")
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()  # http.client knows HEAD responses carry no body
            headers = resp.getheaders()
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP or (name.lower() == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

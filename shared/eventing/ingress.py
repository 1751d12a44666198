"""The broker ingress: `POST /<namespace>/<broker>` with one CloudEvent (binary or structured).

The event is written to the broker topic in Kafka binary mode, keyed by `partitionkey`, and the
answer is 202 only once Kafka has acknowledged the write. 400: not a valid CloudEvent (or a batch);
404: no such broker; 405: not a POST; 413: body over the limit; 503: the write failed or timed out.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson

from shared.errors import FunctionError
from shared.eventing.sink import TopicTarget
from shared.events import decode_http

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
ACK_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: IngressServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("ingress: " + format, *args)

    def _answer(self, status: int, message: str = "") -> None:
        body = orjson.dumps({"status": status, "message": message}) if message else b""
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/healthz", "/readyz"):
            self._answer(200)
        else:
            self._answer(405, "POST one CloudEvent to /<namespace>/<broker>")

    def do_POST(self) -> None:
        target = self.server.brokers.get(self.path.split("?", 1)[0].rstrip("/"))
        length = int(self.headers.get("Content-Length") or 0)
        if target is None:
            self._drain(length)
            self._answer(404, f"no broker at {self.path}")
            return
        if length > self.server.max_body_bytes:
            self._discard(length)
            self.close_connection = True
            self._answer(413, f"body of {length} bytes is over the {self.server.max_body_bytes}-byte limit")
            return
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            mode, events = decode_http(headers, body)
        except FunctionError as exc:
            self._answer(400, exc.message)
            return
        if mode == "batch":
            self._answer(400, "the broker accepts one event per request, not a batch")
            return
        try:
            target.send_and_wait(events[0], ACK_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            log.warning("ingress: write to %s failed: %s", target.topic, exc)
            self._answer(503, f"the broker could not store the event: {exc}")
            return
        self._answer(202)

    def _discard(self, length: int) -> None:
        """Read and drop an oversized body (up to 16x the limit), so the client sees the 413, not a reset."""
        left = min(length, 16 * self.server.max_body_bytes)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _drain(self, length: int) -> None:
        if 0 < length <= self.server.max_body_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True


class IngressServer(ThreadingHTTPServer):
    """Broker ingress on `host:port`; `brokers` maps `/<namespace>/<name>` to the broker topic target."""

    daemon_threads = True

    def __init__(
        self,
        brokers: Mapping[str, TopicTarget],
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
    ):
        super().__init__((host, port), _Handler)
        self.brokers = dict(brokers)
        self.max_body_bytes = max_body_bytes
        self._thread = threading.Thread(target=self.serve_forever, name="ingress", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

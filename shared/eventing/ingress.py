"""The broker ingress: `POST /<namespace>/<broker>` with one CloudEvent (binary or structured).

The event is written to the broker topic in Kafka binary mode, keyed by `partitionkey`, and the
answer is 202 only once Kafka has acknowledged the write. 400: not a valid CloudEvent (or a batch,
or a framing error); 404: no such broker; 405: not a POST (JSON, for every other method); 413:
body over the limit, known from Content-Length or while a chunked body is read; 431: request head
over 64 KiB; 503: the write failed or timed out. `GET`/`HEAD /healthz` and `/readyz` answer 200;
`GET /health` answers the plane's components (200 when none has failed, else 503).

The server is uvicorn with the function server's capped httptools protocol, on its own event
loop in a thread: llhttp does the framing (chunked bodies, Content-Length rules), nothing here
parses HTTP by hand.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

import orjson
import uvicorn

from shared import tracing
from shared.asgi import ClientGone, Receive, Scope, Send, event_headers, header, read_body, respond
from shared.errors import FunctionError
from shared.eventing.sink import TopicTarget
from shared.events import decode_http, with_traceparent
from shared.health import Health, of_thread
from shared.http_protocol import BoundedHttpToolsProtocol

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
ACK_TIMEOUT_S = 10.0
JSON = [(b"content-type", b"application/json")]
HealthSource = Callable[[], list[Health]]


def _answer(status: int, message: str = "") -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return status, list(JSON), orjson.dumps({"status": status, "message": message}) if message else b""


class IngressApp:
    """The ASGI app: one CloudEvent per POST into its broker's topic."""

    def __init__(
        self, brokers: Mapping[str, TopicTarget], max_body_bytes: int, health: HealthSource | None = None
    ) -> None:
        self.brokers = dict(brokers)
        self.max_body_bytes = max_body_bytes
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method in ("GET", "HEAD") and path in ("/healthz", "/readyz"):
            status, headers, body = _answer(200)
        elif method in ("GET", "HEAD") and path == "/health":
            components = self.health() if self.health is not None else []
            status = 503 if any(c.failed for c in components) else 200
            headers, body = list(JSON), orjson.dumps({"components": [c.as_dict() for c in components]})
        elif method != "POST":
            status, headers, body = _answer(405, "POST one CloudEvent to /<namespace>/<broker>")
            headers.append((b"allow", b"POST"))
        else:
            try:
                status, headers, body = await self._post(scope, receive, path.rstrip("/"))
            except ClientGone:
                return
        if method == "HEAD":
            body = b""
        await respond(send, status, headers, body)

    async def _post(self, scope: Scope, receive: Receive, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        arrived = time.time()
        target = self.brokers.get(path)
        if target is None:
            return _answer(404, f"no broker at {path}")
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            mode, events = decode_http(event_headers(scope), body)
        except FunctionError as exc:
            return _answer(exc.status, exc.message)
        if mode == "batch":
            return _answer(400, "the broker accepts one event per request, not a batch")
        loop = asyncio.get_running_loop()
        acked: asyncio.Future[Exception | None] = loop.create_future()

        def settle(error: Exception | None) -> None:
            if not acked.done():  # not timed out meanwhile
                acked.set_result(error)

        def on_acked(error: Exception | None) -> None:  # on the producer's thread
            loop.call_soon_threadsafe(settle, error)

        event, span = events[0], None
        if tracing.enabled():
            parent = event.get("traceparent") or header(scope, b"traceparent")
            attributes = {"cloudevents.event_id": event.id, "cloudevents.event_type": event.type, "url.path": path}
            span = tracing.start(f"ingress {path}", parent, arrived, "server", attributes)
            event = with_traceparent(event, tracing.traceparent(span))
        error: Exception | None
        try:
            target.send(event, on_acked)
        except Exception as exc:  # the producer refused the record (queue full, fatal error)
            error = exc
        else:
            try:
                error = await asyncio.wait_for(acked, ACK_TIMEOUT_S)
            except TimeoutError:
                error = TimeoutError(f"no acknowledgement within {ACK_TIMEOUT_S:.0f} s")
        tracing.end(span, error="" if error is None else str(error))
        if error is not None:
            log.warning("ingress: write to %s failed: %s", target.topic, error)
            return _answer(503, f"the broker could not store the event: {error}")
        return _answer(202)


class IngressServer:
    """Broker ingress on `host:port`; `brokers` maps `/<namespace>/<name>` to the broker topic target."""

    def __init__(
        self,
        brokers: Mapping[str, TopicTarget],
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = MAX_BODY_BYTES,
        health: HealthSource | None = None,
    ):
        self.brokers = dict(brokers)
        self.max_body_bytes = max_body_bytes
        self._socket = socket.create_server((host, port), backlog=1024)
        config = uvicorn.Config(
            IngressApp(brokers, max_body_bytes, health),
            http=BoundedHttpToolsProtocol,
            loop="asyncio",
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name="ingress", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._socket]))

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def own_health(self) -> Health:
        return of_thread("broker-ingress", self.alive or self._server.should_exit, self._server.started, None)

    @property
    def url(self) -> str:
        host, port = self._socket.getsockname()[:2]
        return f"http://{host!s}:{port}"

    def start(self, timeout_s: float = 10.0) -> None:
        """Serve in a thread; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the broker ingress did not start")
            time.sleep(0.005)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __repr__(self) -> str:
        return f"IngressServer({self.url})"

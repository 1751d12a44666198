"""The activator: an asyncio HTTP/1.1 reverse proxy in front of every revision's processes.

Each client connection is bound to a route (a Service URL or a tag URL) by the port it came in on,
or, on the shared gateway port, by its Host header (`<svc>[.<ns>...]` or `<tag>-<svc>[.<ns>...]`,
as Knative names them). A Service URL request picks a revision by the traffic percentages; a tag
URL request goes to the tag's revision. The request then takes a process slot (starting one if the
revision is at zero), is forwarded over a pooled keep-alive connection and the reply relayed.
Retried safely: a pooled connection the process had closed, a process that died (its replacement
answers), and a 503 with Retry-After (a worker still loading); all within `timeoutSeconds`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from shared import tracing
from shared.platform.http import BadRequest, Request, RequestReader, Response, read_response, simple_response
from shared.platform.instance import Instance
from shared.platform.revision import RevisionRuntime, Unavailable

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 5
RETRY_DELAY_S = 0.01
REASONS = {
    400: "Bad Request",
    404: "Not Found",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class Route:
    """Where a request goes: a Service, through one tag or by the traffic split."""

    service: str
    tag: str = ""


class UpstreamLost(Exception):
    """The process did not answer (connection refused or closed before a response)."""


# route -> the revisions it can reach as (runtime, percent); a tag route has one with 100.
Resolver = Callable[[Route], list[tuple[RevisionRuntime, int]] | None]
HostResolver = Callable[[str], Route | None]
AdminHandler = Callable[[Request], bytes | None]


class Activator:
    """Proxies client connections to revisions; one instance serves every listener."""

    def __init__(self, resolve: Resolver, resolve_host: HostResolver, admin: AdminHandler) -> None:
        self.resolve = resolve
        self.resolve_host = resolve_host
        self.admin = admin
        self.connections: set[asyncio.StreamWriter] = set()

    def handler(
        self, route: Route | None
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
        """A connection callback for a listener bound to `route` (None: route by Host header)."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.serve_connection(reader, writer, route)

        return serve

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fixed: Route | None
    ) -> None:
        self.connections.add(writer)
        requests = RequestReader(reader, writer)
        try:
            while True:
                try:
                    request = await requests.next()
                except BadRequest as exc:
                    reason = REASONS.get(exc.status, "Bad Request")
                    writer.write(simple_response(exc.status, reason, str(exc).encode() + b"\n", close=True))
                    await writer.drain()
                    return
                if request is None:
                    return
                keep_alive = await self.answer(request, writer, fixed)
                if not keep_alive:
                    return
                if writer.transport.get_write_buffer_size() > 1 << 16:
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.discard(writer)
            writer.close()

    async def answer(self, request: Request, writer: asyncio.StreamWriter, fixed: Route | None) -> bool:
        """Answer one request; whether the client connection stays open."""
        route = fixed or self.resolve_host(request.host)
        if route is None:
            reply = self.admin(request)
            if reply is None:
                reply = simple_response(404, "Not Found", f"no service for host {request.host!r}\n".encode())
            writer.write(reply)
            return request.keep_alive
        targets = self.resolve(route)
        if not targets:
            writer.write(simple_response(404, "Not Found", f"no route {route.tag or ''}{route.service}\n".encode()))
            return request.keep_alive
        runtime = targets[0][0] if len(targets) == 1 else _choose(targets)
        arrived = time.time()
        try:
            response, inst, cold, forwarded = await self.forward(runtime, request)
        except Unavailable as exc:
            runtime.metrics.requests.labels(runtime.spec.service, runtime.spec.name, str(exc.status)).inc()
            writer.write(simple_response(exc.status, REASONS.get(exc.status, "Error"), exc.message.encode() + b"\n"))
            return request.keep_alive
        writer.write(response.data)
        replied = time.time()
        runtime.release(inst)
        runtime.metrics.requests.labels(runtime.spec.service, runtime.spec.name, str(response.status)).inc()
        if cold is not None:
            runtime.record_cold_start(cold, arrived, forwarded, replied)
        if tracing.enabled():
            _trace(request, runtime, response.status, arrived, forwarded, replied, cold is not None)
        return request.keep_alive and response.keep_alive

    async def forward(
        self, runtime: RevisionRuntime, request: Request
    ) -> tuple[Response, Instance, Instance | None, float]:
        """(response, process holding the slot, process this request cold-started, forward time)."""
        deadline = time.monotonic() + runtime.spec.timeout_s
        cold: Instance | None = None
        for attempt in range(MAX_ATTEMPTS):
            inst, started = await runtime.acquire(deadline)
            cold = cold or started
            forwarded = time.time()
            try:
                response = await self._exchange(inst, request, deadline)
            except UpstreamLost:
                runtime.lost(inst)
                runtime.release(inst)
                continue
            except TimeoutError:
                runtime.release(inst)
                raise Unavailable(504, f"activator request timeout after {runtime.spec.timeout_s:.0f} s") from None
            except BaseException:
                runtime.release(inst)
                raise
            last = attempt == MAX_ATTEMPTS - 1 or time.monotonic() + RETRY_DELAY_S >= deadline
            if response.status == 503 and response.retry_after and not last:
                runtime.release(inst)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            return response, inst, cold, forwarded
        raise Unavailable(502, f"revision {runtime.spec.name}: no process answered after {MAX_ATTEMPTS} attempts")

    async def _exchange(self, inst: Instance, request: Request, deadline: float) -> Response:
        """One request over a pooled connection; a stale pooled connection is retried on a new one."""
        loop = asyncio.get_running_loop()
        for _ in range(2):
            try:
                conn, reused = await inst.connection()
            except OSError:
                raise UpstreamLost from None
            reader, writer = conn
            expired = False

            def expire(writer: asyncio.StreamWriter = writer) -> None:
                nonlocal expired
                expired = True
                writer.close()

            timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), expire)
            try:
                writer.write(request.head + request.body if request.body else request.head)
                response = await read_response(reader, request.method)
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                writer.close()
                if expired:
                    raise TimeoutError from None
                if reused:
                    continue
                raise UpstreamLost from None
            finally:
                timer.cancel()
            inst.give_back(conn, response.keep_alive)
            return response
        raise UpstreamLost


def _trace(
    request: Request,
    runtime: RevisionRuntime,
    status: int,
    arrived: float,
    forwarded: float,
    replied: float,
    cold: bool,
) -> None:
    """The activator's span for one request; a cold start (waiting for a process) is its own child."""
    attributes = {"onnxfn.revision": runtime.spec.name, "http.response.status_code": status, "onnxfn.cold": cold}
    span = tracing.start(f"activator {runtime.spec.service}", request.traceparent, arrived, "server", attributes)
    if isinstance(span, tracing.Span) and span.sampled:
        parent = span
        if cold:
            parts = {f"onnxfn.cold_start.{k}_s": v for k, v in (runtime.last_cold_start or {}).get("parts", {}).items()}
            tracing.record("cold start", parent, arrived, forwarded, parts)
        tracing.record(f"forward {runtime.spec.name}", parent, forwarded, replied, kind="client")
    tracing.end(span, replied, error=f"HTTP {status}" if status >= 500 else "")


def _choose(targets: list[tuple[RevisionRuntime, int]]) -> RevisionRuntime:
    """A revision drawn by the traffic percentages."""
    point = random.random() * sum(percent for _, percent in targets)
    for runtime, percent in targets:
        point -= percent
        if point < 0:
            return runtime
    return targets[-1][0]

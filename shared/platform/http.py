"""HTTP/1.1 for the activator's keep-alive reverse proxy, parsed by httptools (llhttp).

Requests are read whole, with caps enforced while reading: a head over `MAX_HEAD` is 431, a body
over `MAX_BODY` is 413 as soon as it is known (Content-Length, or while a chunked body arrives),
and any framing error (bad chunk size, signed or negative Content-Length, Content-Length with
chunked) is 400. The request is forwarded with a Content-Length (chunked bodies de-chunked) and
without hop-by-hop headers (RFC 9110 7.6.1); `Expect: 100-continue` is answered by the proxy.
Upstream responses are parsed the same way and relayed with a Content-Length, hop-by-hop headers
dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httptools

from shared.http_protocol import MAX_HEAD_BYTES

MAX_HEAD = MAX_HEAD_BYTES  # the function server's cap, one rule for both
MAX_BODY = 16 * 1024 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
READ_SIZE = 65536
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


class BadRequest(Exception):
    """The client sent something this proxy refuses; `status` is the answer (400, 413, 431)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """A request read from a client: head bytes ready to forward, and the body."""

    method: str
    target: str
    host: str
    head: bytes
    body: bytes
    keep_alive: bool
    traceparent: str | None = None  # the request's W3C trace context (`traceparent`, else `ce-traceparent`)


@dataclass
class Response:
    """A response read from upstream, as bytes to relay."""

    status: int
    data: bytes
    keep_alive: bool
    retry_after: bool


def _forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers less the hop-by-hop ones, those that `Connection` names, and Content-Length."""
    named = {token.strip().lower() for name, value in headers if name == b"connection" for token in value.split(b",")}
    drop = HOP_BY_HOP | named | {b"content-length", b"expect"}
    return [(name, value) for name, value in headers if name not in drop]


def _head(first_line: bytes, headers: list[tuple[bytes, bytes]], body_length: int | None) -> bytes:
    lines = [first_line, *(name + b": " + value for name, value in headers)]
    if body_length is not None:
        lines.append(b"Content-Length: %d" % body_length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


@dataclass
class _Message:
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)
    body_size: int = 0
    status: bytes = b""
    headers_done: bool = False
    complete: bool = False
    keep_alive: bool = False
    method: bytes = b""  # request: read when its head completes (a pipelined next one changes the parser's)
    version: str = "1.1"
    status_code: int = 0


class _Collector:
    """httptools callbacks: collects messages, enforcing the head and body caps."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.current = _Message()
        self.head_size = 0
        self.done: deque[_Message] = deque()
        self.in_message = False
        self.parser: Any = None  # set by the owner: keep-alive is read when the head completes
        self.on_headers: Any = None  # called with the message once its head is complete

    def on_message_begin(self) -> None:
        self.current, self.head_size = _Message(), 0
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self.current.url += url
        self._count(len(url))

    def on_status(self, status: bytes) -> None:
        self.current.status += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.lower(), value.strip()))
        self._count(len(name) + len(value) + 4)

    def on_headers_complete(self) -> None:
        self.current.headers_done = True
        parser = self.parser
        self.current.keep_alive = bool(parser.should_keep_alive())
        self.current.version = parser.get_http_version()
        if isinstance(parser, httptools.HttpRequestParser):
            self.current.method = parser.get_method()
        else:
            self.current.status_code = parser.get_status_code()
        if self.on_headers is not None:
            self.on_headers(self.current)

    def on_body(self, body: bytes) -> None:
        self.current.body_size += len(body)
        if self.current.body_size > self.max_body:
            raise BadRequest(f"body over the proxy's {self.max_body}-byte limit", 413)
        self.current.body.append(body)

    def on_message_complete(self) -> None:
        self.current.complete = True
        self.in_message = False
        self.done.append(self.current)

    def _count(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD:
            raise BadRequest(f"request head over {MAX_HEAD} bytes", 431)


def _cause(exc: httptools.HttpParserError) -> BadRequest:
    inner = exc.__context__
    if isinstance(inner, BadRequest):
        return inner
    return BadRequest(f"malformed HTTP: {exc}")


class RequestReader:
    """Requests of one client connection, in order (pipelined ones included)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_body: int = MAX_BODY) -> None:
        self.reader, self.writer = reader, writer
        self.collector = _Collector(max_body)
        self.collector.on_headers = self._headers_done
        self.parser = httptools.HttpRequestParser(self.collector)
        self.collector.parser = self.parser
        self._unparsed = False  # bytes of a request head that has not begun a message yet
        self._head_bytes = 0  # bytes read while the current head is incomplete

    def _headers_done(self, message: _Message) -> None:
        length = next((v for n, v in message.headers if n == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.collector.max_body:
            limit = self.collector.max_body
            raise BadRequest(f"body of {int(length)} bytes is over the proxy's {limit}-byte limit", 413)
        if any(n == b"expect" and v.lower() == b"100-continue" for n, v in message.headers):
            self.writer.write(CONTINUE)

    async def next(self) -> Request | None:
        """The next request; None when the client closed the connection between requests."""
        while not self.collector.done:
            data = await self.reader.read(READ_SIZE)
            if not data:
                if self.collector.in_message or self._unparsed:
                    raise BadRequest("connection closed inside a request")
                return None
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise BadRequest("protocol upgrades are not supported") from None
            except httptools.HttpParserError as exc:
                raise _cause(exc) from None
            self._unparsed = not self.collector.in_message and not self.collector.done and bool(data.strip())
            current = self.collector.current
            in_head = self._unparsed or (self.collector.in_message and not current.headers_done)
            # Counted as read (a head that never ends holds memory in the parser): bounded by cap + one read.
            self._head_bytes = self._head_bytes + len(data) if in_head else 0
            if self._head_bytes > MAX_HEAD:
                raise BadRequest(f"request head over {MAX_HEAD} bytes", 431)
        return self._request(self.collector.done.popleft())

    def _request(self, message: _Message) -> Request:
        method, version = message.method.decode("latin-1"), message.version
        body = b"".join(message.body)
        headers = _forwarded_headers(message.headers)
        first = b"%s %s HTTP/%s" % (method.encode(), message.url, version.encode())
        has_body = body or any(n in (b"content-length", b"transfer-encoding") for n, _ in message.headers)
        head = _head(first, headers, len(body) if has_body else None)
        host = next((v for n, v in message.headers if n == b"host"), b"").decode("latin-1")
        found = dict((n, v) for n, v in message.headers if n in (b"traceparent", b"ce-traceparent"))
        trace = found.get(b"traceparent") or found.get(b"ce-traceparent")
        traceparent = trace.decode("latin-1") if trace else None
        return Request(method, message.url.decode("latin-1"), host, head, body, message.keep_alive, traceparent)


async def read_response(reader: asyncio.StreamReader, method: str) -> Response:
    """One upstream response, whole (raises IncompleteReadError if upstream closed first or sent
    something that does not parse; the proxy answers 502 then). Upstream never gets `Expect`, so
    no interim 1xx response is expected."""
    collector = _Collector(max_body=1 << 62)
    parser = httptools.HttpResponseParser(collector)
    collector.parser = parser
    closed = False
    while not collector.current.complete and not (method == "HEAD" and collector.current.headers_done):
        data = await reader.read(READ_SIZE)
        if not data:
            if not collector.current.headers_done:
                raise asyncio.IncompleteReadError(b"", None)
            closed = True  # a read-to-close body ends here
            break
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            raise asyncio.IncompleteReadError(b"", None) from exc
    status = collector.current.status_code
    if status < 200:
        raise asyncio.IncompleteReadError(b"", None)
    message = collector.current
    body = b"".join(message.body)
    first = b"HTTP/1.1 %d %s" % (status, message.status)
    head = _head(first, _forwarded_headers(message.headers), None if method == "HEAD" else len(body))
    retry_after = any(n == b"retry-after" for n, _ in message.headers)
    return Response(status, head + body, message.keep_alive and not closed, retry_after)


def simple_response(
    status: int, reason: str, body: bytes, content_type: str = "text/plain", close: bool = False
) -> bytes:
    """A complete response the proxy itself answers (errors, metrics, status)."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    )
    return head.encode() + body

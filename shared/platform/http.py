"""Just enough HTTP/1.1 on asyncio streams for a keep-alive reverse proxy.

Requests are read whole (Content-Length or chunked, de-chunked to a Content-Length); responses are
relayed as raw bytes (head plus a Content-Length, chunked or read-to-close body). Headers are
passed through untouched except `Expect: 100-continue`, which the proxy answers itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BadRequest(Exception):
    """The client sent something that is not HTTP/1.1 this proxy understands."""


@dataclass
class Request:
    """A request read from a client: head bytes ready to forward, and the body."""

    method: str
    target: str
    host: str
    head: bytes
    body: bytes
    keep_alive: bool


@dataclass
class Response:
    """A response read from upstream, as raw bytes to relay."""

    status: int
    data: bytes
    keep_alive: bool
    retry_after: bool


def _headers(head: bytes) -> tuple[list[bytes], dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return lines, fields


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """The next request on a client connection; None when the client closed it cleanly."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("connection closed inside a request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("request head too large") from None
    lines, fields = _headers(head[:-4])
    try:
        method, target, version = lines[0].decode("latin-1").split(" ")
    except ValueError:
        raise BadRequest(f"bad request line {lines[0][:80]!r}") from None
    connection = fields.get(b"connection", b"").lower()
    keep_alive = connection != b"close" if version == "HTTP/1.1" else connection == b"keep-alive"
    if fields.get(b"expect", b"").lower() == b"100-continue":
        writer.write(CONTINUE)
        lines = [line for line in lines if not line.lower().startswith(b"expect:")]
        head = b"\r\n".join(lines) + b"\r\n\r\n"
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        body = await _read_chunked(reader)
        kept = [line for line in lines if not line.lower().startswith(b"transfer-encoding:")]
        head = b"\r\n".join([*kept, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n"
    else:
        try:
            length = int(fields.get(b"content-length", b"0"))
        except ValueError:
            raise BadRequest("bad Content-Length") from None
        body = await reader.readexactly(length) if length else b""
    host = fields.get(b"host", b"").decode("latin-1")
    return Request(method, target, host, head, body, keep_alive)


async def read_response(reader: asyncio.StreamReader, method: str) -> Response:
    """One upstream response, whole, as raw bytes (raises IncompleteReadError if upstream closed)."""
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # interim 1xx: skip
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    _, fields = _headers(head[:-4])
    keep_alive = fields.get(b"connection", b"").lower() != b"close"
    retry_after = b"retry-after" in fields
    if method == "HEAD" or status in (204, 304):
        return Response(status, head, keep_alive, retry_after)
    if b"content-length" in fields:
        body = await reader.readexactly(int(fields[b"content-length"]))
        return Response(status, head + body, keep_alive, retry_after)
    if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
        body = await _read_chunked(reader)
        lines = [line for line in head[:-4].split(b"\r\n") if not line.lower().startswith(b"transfer-encoding:")]
        head = b"\r\n".join([*lines, b"Content-Length: %d" % len(body)]) + b"\r\n\r\n"
        return Response(status, head + body, keep_alive, retry_after)
    return Response(status, head + await reader.read(), False, retry_after)


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

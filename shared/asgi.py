"""ASGI helpers shared by every HTTP server of ours (the function, the broker ingress).

The wire is parsed by httptools under uvicorn; these read a request body with its cap enforced
while reading, pick out headers, and write a whole response.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from shared.errors import InvalidEvent, PayloadTooLarge

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise InvalidEvent(f"invalid Content-Length {value.decode('latin-1')!r}")
            return int(value)
    return None


# An oversized body is read and dropped up to this many times the limit before the 413, so a
# client that sends it all first (and asked to close the connection after) still reads the answer.
DRAIN_FACTOR = 16


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes (after
    dropping the rest of it, up to DRAIN_FACTOR x `limit`; memory stays within the limit)."""
    length = _content_length(scope)
    if length is not None and length > limit:
        if length <= DRAIN_FACTOR * limit:
            await _drop(receive, DRAIN_FACTOR * limit)
        raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body"):
                await _drop(receive, DRAIN_FACTOR * limit - size)
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _drop(receive: Receive, budget: int) -> None:
    """Read and discard the rest of a body, at most `budget` bytes."""
    while budget > 0:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            return
        budget -= len(message.get("body", b""))


def header_value(scope: Scope, name: bytes) -> str | None:
    """One request header (lower-case `name`), or None."""
    for raw_name, raw_value in scope["headers"]:
        if raw_name == name:
            return str(raw_value.decode("latin-1"))
    return None


def header(scope: Scope, name: bytes) -> str | None:
    """One request header's value (the first, when repeated), or None; `name` lower-case."""
    for raw_name, raw_value in scope["headers"]:
        if raw_name == name:
            return str(raw_value.decode("latin-1"))
    return None


def event_headers(scope: Scope) -> dict[str, str]:
    """Content-Type and every `ce-*` header (names lower-case); a repeated `ce-*` header is refused."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        if raw_name[:3] == b"ce-" or raw_name == b"content-type":
            name = raw_name.decode("latin-1")
            if name in headers:
                raise InvalidEvent(f"header {name} appears more than once")
            headers[name] = raw_value.decode("latin-1")
    return headers


async def respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

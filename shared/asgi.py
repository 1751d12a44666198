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


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    length = _content_length(scope)
    if length is not None and length > limit:
        raise PayloadTooLarge(f"body of {length} bytes is over the {limit}-byte limit")
    message = await receive()
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    if not message.get("more_body"):
        if message["type"] == "http.disconnect":
            raise ClientGone
        return body
    chunks, size = [body], len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def header_value(scope: Scope, name: bytes) -> str | None:
    """One request header (lower-case `name`), or None."""
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

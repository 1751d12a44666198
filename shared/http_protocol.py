"""The function server's HTTP/1.1 protocol: uvicorn's httptools protocol with a cap on request heads.

httptools (llhttp) parses; uvicorn has no limit on the size of a request line and headers with it,
so a client could make a worker buffer an unbounded head. This counts the bytes of each head as
they arrive and answers 431 (and closes) once a head passes `MAX_HEAD_BYTES` without ending, so
memory stays bounded by the cap plus one read. Bodies are capped by the app while it reads them.
"""

from __future__ import annotations

import asyncio

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024


class HeadTooLarge(Exception):
    """Raised from the parser's callback to stop parsing a refused request."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses request heads over MAX_HEAD_BYTES with 431."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head = True
        self._head_bytes = 0
        self._refused = False
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:  # a whole head that came in one read
            self._refuse_head()
            raise HeadTooLarge
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self._refused:
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # after a 431 the connection is already answered and closing
            super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._refused = True
        body = orjson.dumps(
            {"error": "HeadersTooLarge", "message": f"request line and headers over {MAX_HEAD_BYTES} bytes"}
        )
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head + body)
        self.transport.close()

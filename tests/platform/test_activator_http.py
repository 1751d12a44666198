"""The activator's HTTP: requests parsed by httptools with caps while reading, hop-by-hop headers
dropped when forwarding, and on a running platform: framing errors answered, memory bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from platform_helpers import write_service

from shared.platform import Platform
from shared.platform.http import MAX_BODY, BadRequest, RequestReader, Response, read_response

pytestmark = pytest.mark.timeout(120)


class _Writer:
    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


def parse(raw: bytes, max_body: int = MAX_BODY) -> tuple[list[object], bytes]:
    """Every request (or the BadRequest) `raw` holds, and what the proxy wrote back meanwhile."""

    async def main() -> tuple[list[object], bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        writer = _Writer()
        requests = RequestReader(reader, writer, max_body)  # type: ignore[arg-type]
        out: list[object] = []
        while True:
            try:
                request = await requests.next()
            except BadRequest as exc:
                out.append(exc)
                return out, writer.written
            if request is None:
                return out, writer.written
            out.append(request)

    return asyncio.run(main())


def test_a_chunked_request_is_forwarded_whole_without_hop_by_hop_headers() -> None:
    raw = (
        b"POST /x HTTP/1.1\r\nHost: fn\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
        b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\nce-id: 7\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /y HTTP/1.1\r\nHost: fn\r\n\r\n"
    )
    (first, second), written = parse(raw)
    assert written == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert first.body == b"abcde" and first.host == "fn" and first.keep_alive  # type: ignore[attr-defined]
    head = first.head.lower()  # type: ignore[attr-defined]
    assert b"content-length: 5\r\n" in head and b"ce-id: 7" in head
    for dropped in (b"x-secret", b"keep-alive", b"transfer-encoding", b"expect", b"connection"):
        assert dropped not in head
    assert second.method == "GET" and second.target == "/y" and second.body == b""  # type: ignore[attr-defined]
    assert b"content-length" not in second.head.lower()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +2\r\n\r\nab", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: " + b"a" * 140_000, 431),  # never ends, read in parts
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc", 400),  # closed inside the body
    ],
    ids=[
        "bad-chunk",
        "negative-length",
        "signed-length",
        "length-and-chunked",
        "big-head",
        "endless-head",
        "long",
        "long-chunked",
        "cut",
    ],
)
def test_framing_errors_and_caps(raw: bytes, status: int) -> None:
    (error,), written = parse(raw, max_body=1000)
    assert isinstance(error, BadRequest) and error.status == status, error
    assert written == b""


def _response(raw: bytes) -> Response:
    async def main() -> Response:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        return await read_response(reader, "POST")

    return asyncio.run(main())


def test_a_response_is_relayed_with_a_length_and_without_hop_by_hop_headers() -> None:
    chunked = _response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 5\r\nRetry-After: 1\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert chunked.status == 200 and chunked.retry_after and chunked.keep_alive
    assert chunked.data.endswith(b"Content-Length: 2\r\n\r\nok")
    assert b"keep-alive" not in chunked.data.lower() and b"transfer-encoding" not in chunked.data.lower()
    closing = _response(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    assert closing.status == 204 and not closing.keep_alive


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _send(port: int, head: bytes, body_chunks: int, chunk: bytes) -> bytes:
    """Send a head, then up to `body_chunks` chunks while the proxy keeps reading; its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        try:
            for _ in range(body_chunks):
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the proxy answered and closed: what it said is in the receive buffer
        answer = b""
        try:
            while part := sock.recv(65536):
                answer += part
        except ConnectionResetError:
            pass
        return answer


def test_a_huge_upload_is_refused_while_reading_and_memory_stays_bounded(
    make_platform: Callable[..., Platform], knative: Path
) -> None:
    write_service(knative)
    platform = make_platform()
    port = int(platform.url_for("digits").rsplit(":", 1)[1].strip("/"))
    before = _rss_mb()
    mb = b"1" * (1 << 20)
    answer = _send(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (300 << 20), 300, mb)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    chunk = b"100000\r\n" + mb + b"\r\n"
    answer = _send(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 300, chunk)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert _rss_mb() - before < 50 + MAX_BODY / (1 << 20)
    event = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "dev.onnxfn.digits.request"}
    lines = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in event.items())
    body = orjson.dumps({"image": [1] * 64})
    ok = _send(
        port,
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n%s\r\n" % (len(body), lines),
        1,
        body,
    )
    assert ok.startswith(b"HTTP/1.1 200"), ok[:300]  # still serving

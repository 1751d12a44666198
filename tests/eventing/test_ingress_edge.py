"""The broker ingress on raw sockets: chunked bodies are read whole and stored, framing errors are
400 (never a second request smuggled out of a body), caps hold while reading, and every other
method gets JSON."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import orjson
from eventing_helpers import collect, ids_of, spec_yaml

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.plane import EventPlane

Plane = Callable[[str], EventPlane]


def exchange(url: str, raw: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def first_response(url: str, raw: bytes) -> bytes:
    """Send `raw` from a thread on a keep-alive connection and read one whole response meanwhile
    (the server may answer before the body is all sent)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sender = threading.Thread(target=sock.sendall, args=(raw,), daemon=True)
        sender.start()
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head_part, _, body = received.partition(b"\r\n\r\n")
        length = int(
            next(line.split(b":")[1] for line in head_part.split(b"\r\n") if line.lower().startswith(b"content-length"))
        )
        while len(body) < length:
            body += sock.recv(65536)
        sender.join(timeout=15)
        return head_part + b"\r\n\r\n" + body


def head(path: str, event_id: str, close: bool = True) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{'connection: close' if close else 'x-keep: alive'}\r\n"
        f"ce-specversion: 1.0\r\nce-id: {event_id}\r\n"
        "ce-source: /t\r\nce-type: t.request\r\ncontent-type: application/json\r\n"
    ).encode()


def chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_ingress_edges(plane: Plane, kafka: KafkaConfig, ns: str) -> None:
    p = plane(spec_yaml(ns, []))
    path = f"/{ns}/default"
    data = orjson.dumps({"m": "chunked", "pad": "x" * 200})
    answer = exchange(p.ingress_url, head(path, "c1") + b"transfer-encoding: chunked\r\n\r\n" + chunked(data))
    assert answer.startswith(b"HTTP/1.1 202"), answer[:200]
    # A body that looks like a second request stays a body: one answer, nothing smuggled through.
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(p.ingress_url, head(path, "c2") + b"transfer-encoding: chunked\r\n\r\n" + chunked(smuggled))
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400")  # not JSON data
    for framing in (b"content-length: -5\r\n\r\n{}", b"content-length: +2\r\n\r\n{}", b"content-length: x\r\n\r\n"):
        assert exchange(p.ingress_url, head(path, "bad") + framing).startswith(b"HTTP/1.1 400"), framing
    oversized = chunked(b"1" * (2 << 20), 65536)
    answer = first_response(
        p.ingress_url, head(path, "big", close=False) + b"transfer-encoding: chunked\r\n\r\n" + oversized
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    raw_head = b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"
    assert exchange(p.ingress_url, raw_head).startswith(b"HTTP/1.1 200")
    put = exchange(p.ingress_url, b"PUT /x HTTP/1.1\r\nHost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
    assert put.startswith(b"HTTP/1.1 405") and b"application/json" in put
    topic = f"knative-broker-{ns}-default"
    seen = collect(kafka, [topic], lambda s: "c1" in ids_of(s[topic]))
    stored = {e.id: e for e in seen[topic]}
    assert stored["c1"].data == {"m": "chunked", "pad": "x" * 200}
    assert {"c2", "bad", "big"}.isdisjoint(stored)

"""The function's HTTP edge on raw sockets: framing errors are 4xx, caps hold while reading, and the
server stays healthy after each."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from shared.process import FunctionProcess

pytestmark = pytest.mark.timeout(120)

EVENT_HEAD = (
    b"POST / HTTP/1.1\r\nHost: x\r\nconnection: close\r\nce-specversion: 1.0\r\nce-id: e1\r\nce-source: /t\r\n"
    b"ce-type: dev.onnxfn.digits.request\r\ncontent-type: application/json\r\n"
)
IMAGE = orjson.dumps({"image": [1] * 64})


@pytest.fixture(scope="module")
def digits(model_dir: Path) -> Iterator[FunctionProcess]:
    env = {"ONNXFN_MODEL_DIR": str(model_dir), "ONNXFN_MAX_BODY_BYTES": "65536"}
    with FunctionProcess("digits", env=env) as server:
        server.wait_ready()
        yield server


def exchange(server: FunctionProcess, raw: bytes) -> bytes:
    """Send `raw` (a request with `connection: close`), return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def healthy(server: FunctionProcess) -> bool:
    return requests.get(server.url + "/health/liveness", timeout=5).status_code == 200


def chunked(body: bytes, size: int = 10) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def test_a_chunked_event_is_read_whole(digits: FunctionProcess) -> None:
    answer = exchange(digits, EVENT_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(IMAGE))
    assert status_of(answer) == 200, answer[:300]
    assert b'"label"' in answer


@pytest.mark.parametrize(
    "framing",
    [
        b"transfer-encoding: chunked\r\n\r\nzz\r\n" + IMAGE + b"\r\n0\r\n\r\n",  # bad chunk size
        b"content-length: -5\r\n\r\n" + IMAGE,
        b"content-length: +%d\r\n\r\n" % len(IMAGE) + IMAGE,
        b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(IMAGE) + chunked(IMAGE),
    ],
    ids=["bad-chunk-size", "negative-length", "signed-length", "length-and-chunked"],
)
def test_framing_errors_are_400_and_the_server_stays_up(digits: FunctionProcess, framing: bytes) -> None:
    answer = exchange(digits, EVENT_HEAD + framing)
    assert status_of(answer) == 400, answer[:300]
    assert healthy(digits)


def test_an_oversized_head_is_431(digits: FunctionProcess) -> None:
    answer = exchange(digits, EVENT_HEAD + b"x-padding: " + b"a" * 70 * 1024 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert b"HeadersTooLarge" in answer
    assert healthy(digits)


def test_an_oversized_body_gets_413_that_the_client_reads(digits: FunctionProcess) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "big", "ce-source": "/t", "ce-type": "dev.onnxfn.digits.request"}
    response = requests.post(digits.url, data=b"[" + b"1," * 400_000 + b"1]", headers=headers, timeout=30)
    assert response.status_code == 413  # not a broken pipe: the body is drained, then answered
    assert "limit" in response.json()["message"]
    answer = exchange(digits, EVENT_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"1" * 100_000, 4096))
    assert status_of(answer) == 413  # a chunked body is capped while it is read
    assert healthy(digits)


def test_a_repeated_ce_header_is_refused(digits: FunctionProcess) -> None:
    answer = exchange(digits, EVENT_HEAD + b"ce-id: e2\r\ncontent-length: %d\r\n\r\n" % len(IMAGE) + IMAGE)
    assert status_of(answer) == 400
    assert b"more than once" in answer


def test_a_client_that_closes_after_each_request_still_reads_the_413(digits: FunctionProcess) -> None:
    import urllib.error
    import urllib.request

    headers = {"ce-specversion": "1.0", "ce-id": "big", "ce-source": "/t", "ce-type": "dev.onnxfn.digits.request"}
    request = urllib.request.Request(digits.url, data=b"1" * 800_000, headers=headers, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:  # urllib sends Connection: close
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert healthy(digits)

"""Property tests: arbitrary bytes and headers at every decoder we own never crash, hang or escape as
anything but our own errors (which answer 4xx/5xx by the status table)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import tensor_frames
from shared.errors import FunctionError
from shared.events import decode_http
from shared.oip import decode_request, split_body
from shared.platform.http import BadRequest, RequestReader

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
header_names = st.sampled_from(
    ["ce-id", "ce-source", "ce-type", "ce-specversion", "ce-time", "ce-x", "content-type", "ce-Bad_Name"]
)
content_types = st.sampled_from(
    ["application/json", "application/cloudevents+json", "application/cloudevents-batch+json", "text/plain", ""]
)


@SETTINGS
@given(
    headers=st.dictionaries(header_names, st.text(max_size=30), max_size=6),
    content_type=content_types,
    body=st.binary(max_size=300) | json_values.map(orjson.dumps),
)
def test_cloudevents_decoding_only_raises_our_errors(headers: dict[str, str], content_type: str, body: bytes) -> None:
    if content_type:
        headers["content-type"] = content_type
    try:
        mode, events = decode_http(headers, body)
    except FunctionError as exc:
        assert 400 <= exc.status < 500
        return
    assert mode in ("binary", "structured", "batch") and events


@SETTINGS
@given(body=json_values, binary=st.binary(max_size=64), header_length=st.none() | st.text(max_size=6))
def test_oip_decoding_only_raises_our_errors(body: object, binary: bytes, header_length: str | None) -> None:
    raw = orjson.dumps(body)
    try:
        text, rest = split_body(raw + binary, header_length)
        decode_request(orjson.loads(text), rest, ["probabilities"])
    except FunctionError as exc:
        assert exc.status == 400
    except orjson.JSONDecodeError:
        pass  # the app answers this as InvalidEvent (400)


@SETTINGS
@given(data=st.binary(max_size=400))
def test_tensor_frames_refuse_garbage_cleanly(data: bytes) -> None:
    for decode in (tensor_frames.decode_request, tensor_frames.decode_reply):
        with contextlib.suppress(tensor_frames.FrameError):
            decode(data)


request_lines = st.sampled_from([b"POST / HTTP/1.1\r\n", b"GET /x HTTP/1.0\r\n", b"PUT  HTTP/1.1\r\n", b"\r\n"])
header_lines = st.lists(
    st.sampled_from(
        [
            b"Host: a\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: -1\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"Expect: 100-continue\r\n",
        ]
    )
    | st.binary(max_size=40),
    max_size=6,
)


@SETTINGS
@given(line=request_lines, headers=header_lines, rest=st.binary(max_size=200))
def test_the_activator_parser_answers_or_refuses_never_crashes(line: bytes, headers: list[bytes], rest: bytes) -> None:
    class Writer:
        def write(self, data: bytes) -> None:
            pass

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(line + b"".join(headers) + b"\r\n" + rest)
        reader.feed_eof()
        requests = RequestReader(reader, Writer(), max_body=100)  # type: ignore[arg-type]
        for _ in range(10):  # bounded: the input holds at most a few requests
            try:
                if await requests.next() is None:
                    return
            except BadRequest as exc:
                assert exc.status in (400, 413, 431)
                return

    asyncio.run(asyncio.wait_for(main(), 5))


@SETTINGS
@given(value=st.text(max_size=12))
def test_retry_after_never_raises(value: str) -> None:
    from shared.eventing.delivery import retry_after_s

    seconds = retry_after_s(value, now=0.0)
    assert seconds is None or seconds >= 0

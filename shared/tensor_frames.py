"""Length-prefixed frames of named numpy tensors between HTTP workers and the engine process.

    frame    = u32 length, body
    request  = u64 id, u8 flags (1: admitted), u16 count, tensor * count
    reply    = u64 id, u16 status (0: ok, else the error's HTTP status), then
               status 0: u16 count, tensor * count;  otherwise: u32 length, UTF-8 message
    tensor   = u16 name length, name, u8 dtype length, dtype (numpy str, e.g. "<f4"),
               u8 rank, u64 * rank dims, the C-order bytes

Raw bytes only (no pickle); dtypes outside `ALLOWED_DTYPES` are refused. Little-endian throughout.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

Feeds = dict[str, np.ndarray]
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str for t in ("<f4", "<f8", "<f2", "<i8", "<i4", "<i2", "|i1", "|u1", "|b1", "<u2", "<u4", "<u8")
)
LENGTH = struct.Struct("<I")
REQUEST = struct.Struct("<QB")
REPLY = struct.Struct("<QH")
COUNT = struct.Struct("<H")
MESSAGE = struct.Struct("<I")
ADMITTED = 1


class FrameError(ValueError):
    """A frame that does not decode."""


def _tensors(feeds: Feeds) -> list[bytes]:
    parts = [COUNT.pack(len(feeds))]
    for name, value in feeds.items():
        array = value if value.flags.c_contiguous else np.array(value, order="C")  # keeps rank 0
        encoded, dtype = name.encode(), array.dtype.str.encode()
        parts.append(
            struct.pack(f"<H{len(encoded)}sB{len(dtype)}sB", len(encoded), encoded, len(dtype), dtype, array.ndim)
        )
        parts.append(struct.pack(f"<{array.ndim}Q", *array.shape))
        parts.append(array.tobytes())
    return parts


def _frame(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    return LENGTH.pack(len(body)) + body


def encode_request(request_id: int, feeds: Feeds, admitted: bool = False) -> bytes:
    return _frame([REQUEST.pack(request_id, ADMITTED if admitted else 0), *_tensors(feeds)])


def encode_reply(request_id: int, outputs: Feeds) -> bytes:
    return _frame([REPLY.pack(request_id, 0), *_tensors(outputs)])


def encode_error(request_id: int, status: int, message: str) -> bytes:
    text = message.encode()
    return _frame([REPLY.pack(request_id, status), MESSAGE.pack(len(text)), text])


def _decode_tensors(body: memoryview, offset: int) -> Feeds:
    (count,) = COUNT.unpack_from(body, offset)
    offset += COUNT.size
    feeds: Feeds = {}
    for _ in range(count):
        (name_length,) = struct.unpack_from("<H", body, offset)
        offset += 2
        name = bytes(body[offset : offset + name_length]).decode()
        offset += name_length
        dtype_length = body[offset]
        offset += 1
        dtype_text = bytes(body[offset : offset + dtype_length]).decode()
        offset += dtype_length
        if dtype_text not in ALLOWED_DTYPES:
            raise FrameError(f"tensor {name!r}: dtype {dtype_text!r} is not allowed")
        rank = body[offset]
        offset += 1
        shape = struct.unpack_from(f"<{rank}Q", body, offset)
        offset += 8 * rank
        dtype = np.dtype(dtype_text)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(body):
            raise FrameError(f"tensor {name!r}: {size} bytes announced, {len(body) - offset} left")
        feeds[name] = np.frombuffer(body, dtype, int(np.prod(shape, dtype=np.int64)), offset).reshape(shape)
        offset += size
    if offset != len(body):
        raise FrameError(f"{len(body) - offset} bytes after the last tensor")
    return feeds


def decode_request(body: bytes) -> tuple[int, bool, Feeds]:
    """A request body (without its length prefix) -> (id, admitted, feeds)."""
    view = memoryview(body)
    try:
        request_id, flags = REQUEST.unpack_from(view, 0)
        return request_id, bool(flags & ADMITTED), _decode_tensors(view, REQUEST.size)
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise FrameError(f"bad request frame: {exc}") from None


def decode_reply(body: bytes) -> tuple[int, int, Any]:
    """A reply body -> (id, status, outputs when status is 0 else the error message)."""
    view = memoryview(body)
    try:
        request_id, status = REPLY.unpack_from(view, 0)
        if status == 0:
            return request_id, 0, _decode_tensors(view, REPLY.size)
        (length,) = MESSAGE.unpack_from(view, REPLY.size)
        start = REPLY.size + MESSAGE.size
        return request_id, status, bytes(view[start : start + length]).decode()
    except (struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
        raise FrameError(f"bad reply frame: {exc}") from None

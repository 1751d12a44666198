"""Frames between workers and the engine: tensors survive the trip exactly; bad frames are refused."""

from __future__ import annotations

import numpy as np
import pytest

from shared import tensor_frames as frames


def body(frame: bytes) -> bytes:
    (length,) = frames.LENGTH.unpack_from(frame)
    assert length == len(frame) - frames.LENGTH.size
    return frame[frames.LENGTH.size :]


def test_request_and_reply_round_trip_every_dtype_and_shape() -> None:
    feeds = {
        "input_ids": np.arange(12, dtype=np.int64).reshape(2, 6),
        "image": np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32),
        "mask": np.array([[True, False]]),
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), np.float16),
    }
    request_id, admitted, decoded = frames.decode_request(body(frames.encode_request(41, feeds, admitted=True)))
    assert (request_id, admitted) == (41, True)
    assert decoded.keys() == feeds.keys()
    for name, value in feeds.items():
        assert decoded[name].dtype == value.dtype and decoded[name].shape == value.shape
        assert np.array_equal(decoded[name], value)
    reply_id, status, outputs = frames.decode_reply(body(frames.encode_reply(41, {"y": feeds["image"][:, 0]})))
    assert (reply_id, status) == (41, 0) and np.array_equal(outputs["y"], feeds["image"][:, 0])


def test_an_error_reply_carries_its_status_and_message() -> None:
    assert frames.decode_reply(body(frames.encode_error(7, 429, "queue full ✓"))) == (7, 429, "queue full ✓")


def test_a_non_contiguous_array_is_sent_in_c_order() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    _, _, decoded = frames.decode_request(body(frames.encode_request(1, {"x": array})))
    assert np.array_equal(decoded["x"], array)


def test_object_dtypes_and_truncated_frames_are_refused() -> None:
    good = body(frames.encode_request(1, {"x": np.ones((2, 2), np.float32)}))
    forged = good.replace(b"<f4", b"|O8")
    with pytest.raises(frames.FrameError, match="not allowed"):
        frames.decode_request(forged)
    with pytest.raises(frames.FrameError):
        frames.decode_request(good[:-3])
    with pytest.raises(frames.FrameError, match="after the last tensor"):
        frames.decode_request(good + b"junk")

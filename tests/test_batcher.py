"""DynamicBatcher: batching under concurrency, grouping by shape, bounded queue, failures."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from shared.batcher import DynamicBatcher
from shared.errors import InferenceFailed, QueueFull


def doubling(calls: list[int], delay: float = 0.0):  # type: ignore[no-untyped-def]
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(len(feeds["x"]))
        time.sleep(delay)
        return {"y": feeds["x"] * 2}

    return run


def test_concurrent_items_share_runs_and_get_their_own_rows() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(doubling(calls, 0.005), max_batch_size=16, max_queue_delay_s=0.005, capacity=100)
    results: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        batcher.arriving()
        try:
            results[i] = batcher.infer({"x": np.full((1, 2), i, np.float32)})["y"]
        finally:
            batcher.left()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all((results[i] == 2 * i).all() and results[i].shape == (1, 2) for i in range(40))
    assert sum(calls) == 40
    assert max(calls) > 1 and max(calls) <= 16


def test_a_lone_request_does_not_wait_for_company() -> None:
    batcher = DynamicBatcher(doubling([]), max_batch_size=16, max_queue_delay_s=0.5, capacity=10)
    batcher.arriving()
    started = time.perf_counter()
    batcher.infer({"x": np.ones((1, 1), np.float32)})
    assert time.perf_counter() - started < 0.1


def test_items_of_different_shapes_run_separately() -> None:
    calls: list[int] = []
    release = threading.Event()

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        release.wait(5)
        calls.append(feeds["x"].shape[1])
        return {"y": feeds["x"].sum(axis=1)}

    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0, capacity=10)
    first = batcher.submit({"x": np.ones((1, 4), np.float32)})
    time.sleep(0.05)  # the batcher now blocks inside run() with the first item
    items = [batcher.submit({"x": np.ones((1, n), np.float32)}) for n in (8, 16, 8)]
    release.set()
    assert batcher.result(first)["y"].tolist() == [4]
    assert [batcher.result(i)["y"].tolist() for i in items] == [[8], [16], [8]]
    assert sorted(calls[1:]) == [8, 16]


def test_full_queue_raises_queue_full() -> None:
    release = threading.Event()
    batcher = DynamicBatcher(lambda f: (release.wait(5), f)[1], max_batch_size=1, max_queue_delay_s=0, capacity=2)
    batcher.submit({"x": np.ones((1, 1))})
    time.sleep(0.05)
    batcher.submit({"x": np.ones((1, 1))})
    batcher.submit({"x": np.ones((1, 1))})
    with pytest.raises(QueueFull):
        batcher.submit({"x": np.ones((1, 1))})
    release.set()


def test_a_failing_run_fails_its_items_and_the_batcher_lives_on() -> None:
    fail = [True]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if fail[0]:
            raise RuntimeError("boom")
        return feeds

    batcher = DynamicBatcher(run, max_batch_size=4, max_queue_delay_s=0, capacity=10)
    with pytest.raises(InferenceFailed, match="boom"):
        batcher.infer({"x": np.ones((1, 1))})
    fail[0] = False
    assert batcher.infer({"x": np.ones((1, 1))})["x"].shape == (1, 1)


def test_multi_row_items_are_not_split_across_runs() -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(doubling(calls), max_batch_size=4, max_queue_delay_s=0, capacity=10)
    out = batcher.infer({"x": np.arange(6, dtype=np.float32).reshape(3, 2)})
    assert out["y"].tolist() == [[0, 2], [4, 6], [8, 10]]

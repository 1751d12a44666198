"""DynamicBatcher: batching of one loop's items, grouping by shape, bounded queue, failures.

Each test runs both ways a model can run: inline on the loop, and in the inference thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from shared.batcher import DynamicBatcher, Feeds
from shared.errors import InferenceFailed, QueueFull

Run = Callable[[Feeds], Feeds]


def doubling(calls: list[int]) -> Run:
    def run(feeds: Feeds) -> Feeds:
        calls.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    return run


@pytest.fixture(params=[True, False], ids=["inline", "thread"])
def inline(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_items_queued_in_one_loop_turn_share_runs_and_get_their_own_rows(inline: bool) -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(doubling(calls), max_batch_size=16, capacity=100, inline=inline)

    async def main() -> list[Feeds]:
        return await asyncio.gather(*(batcher.infer({"x": np.full((1, 2), i, np.float32)}) for i in range(40)))

    results = asyncio.run(main())
    assert all((r["y"] == 2 * i).all() and r["y"].shape == (1, 2) for i, r in enumerate(results))
    assert sum(calls) == 40
    assert calls == [16, 16, 8]  # 40 concurrent items: full batches, no item waits beyond its turn


def test_a_lone_item_runs_in_a_run_of_its_own(inline: bool) -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(doubling(calls), max_batch_size=16, capacity=10, inline=inline)

    async def main() -> None:
        for i in range(3):
            out = await batcher.infer({"x": np.full((1, 1), i, np.float32)})
            assert out["y"].tolist() == [[2 * i]]

    asyncio.run(main())
    assert calls == [1, 1, 1]


def test_items_arriving_during_a_run_form_the_next_batch() -> None:
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def run(feeds: Feeds) -> Feeds:
        calls.append(len(feeds["x"]))
        started.set()
        release.wait(5)
        return feeds

    batcher = DynamicBatcher(run, max_batch_size=8, capacity=10)

    async def main() -> None:
        first = batcher.submit({"x": np.ones((1, 1))})
        await asyncio.to_thread(started.wait, 5)  # the first run is now in progress
        later = [batcher.submit({"x": np.ones((1, 1))}) for _ in range(5)]
        release.set()
        await asyncio.gather(first, *later)

    asyncio.run(main())
    assert calls == [1, 5]


def test_items_of_different_shapes_run_separately(inline: bool) -> None:
    calls: list[int] = []

    def run(feeds: Feeds) -> Feeds:
        calls.append(feeds["x"].shape[1])
        return {"y": feeds["x"].sum(axis=1)}

    batcher = DynamicBatcher(run, max_batch_size=8, capacity=10, inline=inline)

    async def main() -> list[Feeds]:
        return await asyncio.gather(*(batcher.infer({"x": np.ones((1, n), np.float32)}) for n in (4, 8, 16, 8)))

    results = asyncio.run(main())
    assert [r["y"].tolist() for r in results] == [[4], [8], [16], [8]]
    assert sorted(calls) == [4, 8, 16]


def test_full_queue_raises_queue_full_and_admitted_items_still_run(inline: bool) -> None:
    batcher = DynamicBatcher(doubling([]), max_batch_size=1, capacity=2, inline=inline)

    async def main() -> None:
        futures = [batcher.submit({"x": np.ones((1, 1))}) for _ in range(2)]
        with pytest.raises(QueueFull, match="queue full"):
            batcher.submit({"x": np.ones((1, 1))})
        futures.append(batcher.submit({"x": np.ones((1, 1))}, admitted=True))  # rest of a batched request
        assert len(await asyncio.gather(*futures)) == 3
        await batcher.infer({"x": np.ones((1, 1))})  # room again once the queue drained

    asyncio.run(main())


def test_a_failing_run_fails_its_items_and_the_batcher_lives_on(inline: bool) -> None:
    fail = [True]

    def run(feeds: Feeds) -> Feeds:
        if fail[0]:
            raise RuntimeError("boom")
        return feeds

    batcher = DynamicBatcher(run, max_batch_size=4, capacity=10, inline=inline)

    async def main() -> None:
        with pytest.raises(InferenceFailed, match="boom"):
            await batcher.infer({"x": np.ones((1, 1))})
        fail[0] = False
        assert (await batcher.infer({"x": np.ones((1, 1))}))["x"].shape == (1, 1)

    asyncio.run(main())


def test_multi_row_items_are_not_split_across_runs(inline: bool) -> None:
    calls: list[int] = []
    batcher = DynamicBatcher(doubling(calls), max_batch_size=4, capacity=10, inline=inline)

    async def main() -> list[Feeds]:
        three = np.arange(6, dtype=np.float32).reshape(3, 2)
        return await asyncio.gather(batcher.infer({"x": three}), batcher.infer({"x": three}))

    first, second = asyncio.run(main())
    assert first["y"].tolist() == second["y"].tolist() == [[0, 2], [4, 6], [8, 10]]
    assert calls == [3, 3]


def test_with_two_inference_threads_two_runs_proceed_at_once() -> None:
    both_running = threading.Barrier(2, timeout=5)  # breaks (BrokenBarrierError) unless two runs overlap
    calls: list[int] = []

    def run(feeds: Feeds) -> Feeds:
        calls.append(len(feeds["x"]))
        if len(calls) <= 2:
            both_running.wait()
        return feeds

    batcher = DynamicBatcher(run, max_batch_size=4, capacity=100, threads=2)

    async def main() -> list[Feeds]:
        return await asyncio.gather(*(batcher.infer({"x": np.full((1, 1), i)}) for i in range(10)))

    results = asyncio.run(main())
    assert [int(r["x"][0, 0]) for r in results] == list(range(10))
    assert calls[:2] == [4, 4] and sum(calls) == 10

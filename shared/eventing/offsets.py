"""Which offsets may be committed: per partition, everything below the oldest unfinished record.

Records finish out of order (unordered delivery, retries); the commit point only moves over a
contiguous run of finished records, so a crash never skips an event whose outcome is not final.
"""

from __future__ import annotations

import threading
from collections import deque

TopicPartitionKey = tuple[str, int]


class _Partition:
    __slots__ = ("done", "pending")

    def __init__(self) -> None:
        self.pending: deque[int] = deque()
        self.done: set[int] = set()


class OffsetTracker:
    """Thread-safe: `add` in consumption order, `finish` from any thread, `commit_points` to commit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[TopicPartitionKey, _Partition] = {}
        self._ready: dict[TopicPartitionKey, int] = {}
        self.in_flight = 0

    def add(self, tp: TopicPartitionKey, offset: int) -> None:
        with self._lock:
            self._partitions.setdefault(tp, _Partition()).pending.append(offset)
            self.in_flight += 1

    def passed(self, tp: TopicPartitionKey, offset: int) -> None:
        """A record that is final as soon as it is seen (filtered out): `add` and `finish` at once."""
        with self._lock:
            part = self._partitions.setdefault(tp, _Partition())
            if part.pending:
                part.pending.append(offset)
                part.done.add(offset)
            else:
                self._ready[tp] = offset + 1

    def finish(self, tp: TopicPartitionKey, offset: int) -> None:
        """Mark one record final. Unknown partitions (revoked meanwhile) are ignored."""
        with self._lock:
            part = self._partitions.get(tp)
            if part is None:
                return
            self.in_flight -= 1
            part.done.add(offset)
            last = None
            while part.pending and part.pending[0] in part.done:
                last = part.pending.popleft()
                part.done.discard(last)
            if last is not None:
                self._ready[tp] = last + 1

    def first_unfinished(self, tp: TopicPartitionKey) -> int | None:
        """The oldest record of `tp` not final yet (None when every record added is final)."""
        with self._lock:
            part = self._partitions.get(tp)
            return part.pending[0] if part is not None and part.pending else None

    def commit_points(self) -> dict[TopicPartitionKey, int]:
        """Offsets to commit since the last call (next offset to read, per partition)."""
        with self._lock:
            ready, self._ready = self._ready, {}
            return ready

    def forget(self, tps: list[TopicPartitionKey]) -> dict[TopicPartitionKey, int]:
        """Drop revoked partitions; returns their last commit points."""
        with self._lock:
            out = {tp: self._ready.pop(tp) for tp in tps if tp in self._ready}
            for tp in tps:
                part = self._partitions.pop(tp, None)
                if part is not None:
                    self.in_flight -= len(part.pending) - len(part.done)
            return out

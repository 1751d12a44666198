"""A lean HTTP/1.1 load generator on asyncio (keep-alive; reconnects when the server closes).

Sends one prepared request over `concurrency` connections for a fixed count or duration and
records each request's latency. It runs in the benchmark's own process, so its CPU is counted in
every figure alike (one run, same generator, same machine).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    """Latencies of successful requests and counts of failures."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def build_request(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    close = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lower = name.strip().lower()
        if lower == b"content-length":
            length = int(value)
        elif lower == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _worker(
    host: str, port: int, request: bytes, deadline: float, budget: list[int], result: LoadResult, expect: int
) -> None:
    reader = writer = None
    while budget[0] > 0 and time.perf_counter() < deadline:
        budget[0] -= 1
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            assert reader is not None
            started = time.perf_counter()
            writer.write(request)
            status, close = await _read_response(reader)
            elapsed = time.perf_counter() - started
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status == expect:
                result.latencies.append(elapsed)
            if close:
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _run(
    host: str, port: int, request: bytes, concurrency: int, count: int, duration: float, expect: int
) -> LoadResult:
    result = LoadResult()
    budget = [count]
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(_worker(host, port, request, deadline, budget, result, expect) for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


def run_load(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    body: bytes,
    *,
    concurrency: int,
    count: int = 10**9,
    duration: float = 5.0,
    expect: int = 200,
) -> LoadResult:
    """Send `count` requests (or for `duration` seconds, whichever ends first) over `concurrency` connections."""
    request = build_request(host, port, path, headers, body)
    return asyncio.run(_run(host, port, request, concurrency, count, duration, expect))

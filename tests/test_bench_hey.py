"""Reading hey's report (the benchmarks' outside load generator) and a process tree's CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from shared.bench.hey import parse, tree_cpu_seconds

REPORT = """
Summary:
  Total:\t10.0413 secs
  Requests/sec:\t379.5333

Response time histogram:
  0.018 [1]\t|
  0.070 [828]\t|■■■■■■■■■■■■■■■■■■■■■■■■■■■

Latency distribution:
  10% in 0.0656 secs
  50% in 0.0819 secs
  99% in 0.1318 secs

Status code distribution:
  [200]\t3811 responses
  [429]\t12 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:8080/": EOF
  [1]\tPost "http://127.0.0.1:8080/": read: connection reset by peer
"""


def test_rate_latencies_statuses_and_errors_are_read() -> None:
    result = parse(REPORT)
    assert result.req_per_s == 379.5333
    assert (result.p50_ms, result.p99_ms) == (81.9, 131.8)
    assert result.statuses == {200: 3811, 429: 12}  # the histogram's [828] is not a status
    assert result.ok == 3811 and result.errors == 4


def test_cpu_of_a_process_tree_counts_its_children() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ninput()"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"],
        stdin=subprocess.PIPE,
    )
    try:
        deadline_cpu = 0.0
        for _ in range(200):  # until the child has burnt its 0.3 s (bounded)
            deadline_cpu = tree_cpu_seconds(parent.pid)
            if deadline_cpu >= 0.3:
                break
            os.sched_yield()
            subprocess.run(["sleep", "0.02"], check=True)
        assert deadline_cpu >= 0.3
    finally:
        parent.stdin.close()  # type: ignore[union-attr]
        parent.wait(10)

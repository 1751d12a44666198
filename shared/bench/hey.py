"""Load from `hey` (Debian's package; keep-alive on), and server CPU read from /proc.

The load generator is an outside program, so no system is measured with a client of ours.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class HeyResult:
    """What one hey run reported."""

    req_per_s: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)


def hey_path() -> str:
    path = shutil.which("hey")
    if path is None:
        raise SystemExit("hey is not installed: `make bench` installs it (apt-get install hey)")
    return path


def parse(output: str) -> HeyResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"50% in ([\d.]+) secs", output)
    p99 = re.search(r"99% in ([\d.]+) secs", output)
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", output)}
    _, _, error_part = output.partition("Error distribution:")
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]", error_part, re.MULTILINE))
    return HeyResult(
        req_per_s=float(rate.group(1)) if rate else 0.0,
        p50_ms=float(p50.group(1)) * 1000 if p50 else float("nan"),
        p99_ms=float(p99.group(1)) * 1000 if p99 else float("nan"),
        statuses=statuses,
        errors=errors,
    )


def run_hey(url: str, headers: dict[str, str], body: bytes, concurrency: int, seconds: float) -> HeyResult:
    """POST `body` to `url` over `concurrency` keep-alive connections for `seconds`."""
    with tempfile.NamedTemporaryFile(prefix="onnxfn-hey-", suffix=".body") as file:
        file.write(body)
        file.flush()
        argv = [hey_path(), "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-D", file.name]
        for name, value in headers.items():
            if name.lower() == "content-type":
                argv += ["-T", value]
            else:
                argv += ["-H", f"{name}: {value}"]
        done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=False)
    return parse(done.stdout)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` and every live descendant, in seconds."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        todo += _children(current)
    return total / CLOCK_TICKS

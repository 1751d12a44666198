"""`onnxfn up` (what `make run` runs) as a real process: functions at zero behind the platform, the sample
stream answered through cold starts, back to zero after the idle window, a clean exit on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shared.eventing.up import ScaleWatcher, cold_start_line

ROOT = Path(__file__).resolve().parents[2]
IDLE_WINDOW_S = 2.0


class Output:
    """Lines of a child process's stdout, read in a thread; `wait_for` blocks until one matches."""

    def __init__(self, process: subprocess.Popen[str]):
        self.lines: list[str] = []
        self.queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        self.stream = process.stdout
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.stream:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if (match := regex.search(line)) is not None:
                return match
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if (match := regex.search(line)) is not None:
                return match
        raise AssertionError(f"no line matching {pattern!r} in {timeout_s:.0f} s; output:\n" + "\n".join(self.lines))


def start_up(argv: list[str]) -> subprocess.Popen[str]:
    """`onnxfn ARGV` in its own session, on its own embedded broker, output merged into stdout."""
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def stop_up(process: subprocess.Popen[str]) -> int:
    """SIGTERM `onnxfn up` and wait for its exit code (its whole session killed after 60 s)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


def onnxfn(*argv: str, timeout_s: float = 20.0) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "shared.cli", *argv], capture_output=True, text=True, timeout=timeout_s, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_up_serves_the_samples_through_cold_starts_then_scales_to_zero_and_stops_on_sigterm(tmp_path: Path) -> None:
    if not (ROOT / "models" / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    argv = ["up", "--samples", "5", "--idle-window", str(IDLE_WINDOW_S), "--ingress-port", "0"]
    argv += ["--state-file", str(tmp_path / "platform.json")]  # not the default one a running `make run` uses
    process = start_up(argv)
    try:
        out = Output(process)
        out.wait_for(r"^READY$", 40)
        bootstrap = out.wait_for(r"^Kafka bootstrap servers: (\S+)", 0).group(1)
        gateway = out.wait_for(r"^platform gateway: (\S+)", 0).group(1)
        out.wait_for(r"^function digits\s+http://127\.0\.0\.1:\d+/\s+\(at zero", 0)
        out.wait_for(r"^  tag current-digits\s+http://127\.0\.0\.1:\d+/ -> digits-", 0)
        assert json.loads((tmp_path / "platform.json").read_text())["gateway"] == gateway

        # The first digits event wakes the function: one cold start line with its parts.
        cold = out.wait_for(r"^cold start (digits-\S+): ([\d.]+) s \(process [\d.]+, load [\d.]+, warm-up", 40)
        revision = cold.group(1)
        assert 0 < float(cold.group(2)) < 30

        # Every sample image answered on the result topic (read from the broker, not the printout).
        topic = "onnxfn.digits.results"
        read = ["--bootstrap-servers", bootstrap, "--from-beginning", "--max", "5", "--idle-timeout", "20"]
        results = onnxfn("results", topic, *read, timeout_s=30)
        events = [json.loads(line) for line in results.splitlines() if line.strip()]
        assert len(events) == 5
        assert all(e["type"] == "dev.onnxfn.digits.result" and "label" in e["data"] for e in events)

        # After the idle window: back to zero, in the printout and in `onnxfn status`.
        out.wait_for(rf"^{re.escape(revision)} scaled to zero", IDLE_WINDOW_S + 20)
        status = json.loads(onnxfn("status", "--json", "--url", gateway))
        digits = next(s for s in status["services"] if s["name"] == "digits")
        rev = next(r for r in digits["revisions"] if r["revision"] == revision)
        assert (rev["ready"], rev["starting"], rev["processes"]) == (0, 0, [])
        assert rev["last_cold_start"]["seconds"] > 0

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        out.wait_for(r"^shutting down", 5)
        assert not (tmp_path / "platform.json").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _status(ready: int, cold_at: float | None, stopping: int = 0) -> dict[str, Any]:
    cold = None
    if cold_at is not None:
        parts = {"process_start": 0.2, "model_load": 0.01, "warmup": 0.0, "ready_detect": 0.01, "first_inference": 0.0}
        cold = {"seconds": 0.31, "at": cold_at, "parts": parts}
    revision = {"revision": "digits-v1", "ready": ready, "starting": 0, "stopping": stopping, "idle_window_s": 2.0}
    return {"services": [{"name": "digits", "revisions": [{**revision, "last_cold_start": cold}]}]}


def test_scale_watcher_reports_each_cold_start_once_and_the_return_to_zero() -> None:
    states = iter(
        [
            _status(0, None),  # at start: nothing to say
            _status(1, 100.0),  # woke up
            _status(1, 100.0),  # still up: nothing new
            _status(0, 100.0, stopping=1),  # out of routing, still draining
            _status(0, 100.0),  # gone
            _status(0, 200.0),  # woke up and went back to zero between two polls
        ]
    )
    watcher = ScaleWatcher(lambda: next(states))
    assert watcher.poll() == []
    assert watcher.poll() == [
        "cold start digits-v1: 0.31 s (process 0.20, load 0.01, warm-up 0.00, ready probe 0.01, first inference 0.00)"
    ]
    assert watcher.poll() == []
    assert watcher.poll() == []
    assert watcher.poll() == ["digits-v1 scaled to zero (idle 2 s)"]
    again = _status(0, 200.0)["services"][0]["revisions"][0]["last_cold_start"]
    assert watcher.poll() == [cold_start_line("digits-v1", again), "digits-v1 scaled to zero (idle 2 s)"]


def test_up_reports_a_broker_that_dies_and_exits_1(tmp_path: Path) -> None:
    """A component that dies is seen: kill the embedded broker and `up` says so and stops (exit 1)."""
    urls = [
        arg for name in ("digits", "embed", "postprocess") for arg in ("--function-url", f"{name}=http://127.0.0.1:9/")
    ]
    state = tmp_path / "platform.json"
    argv = ["up", "--samples", "0", "--no-functions", "--quiet", "--ingress-port", "0", "--state-file", str(state)]
    process = start_up([*argv, *urls])
    try:
        out = Output(process)
        out.wait_for(r"^READY$", 40)
        shown = json.loads(onnxfn("status", "--json", "--state-file", str(state)))
        components = {c["component"]: c for c in shown["plane"]["components"]}
        assert components["embedded broker"]["state"] == "ready" and components["broker-ingress"]["state"] == "ready"
        assert any(name.startswith("fanout-") for name in components)
        assert {c["state"] for c in components.values()} == {"ready"}
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        (broker,) = [int(p) for p in children if b"--listener-url" in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.kill(broker, signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        out.wait_for(r"embedded broker failed \(exited with code -9\): stopping everything", 5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        children = []
        for task in Path(f"/proc/{current}/task").glob("*"):  # a child belongs to the thread that forked it
            try:
                children += (task / "children").read_text().split()
            except OSError:
                continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.fault
def test_up_killed_with_sigkill_leaves_no_process_behind(tmp_path: Path) -> None:
    """The broker, the platform and a running function process all end when `up` is SIGKILLed."""
    if not (ROOT / "models" / "digits").is_dir():
        pytest.skip("no digits model: run `make models`")
    argv = ["up", "--samples", "1", "--quiet", "--idle-window", "600", "--ingress-port", "0"]
    process = start_up([*argv, "--state-file", str(tmp_path / "platform.json")])
    try:
        out = Output(process)
        out.wait_for(r"^READY$", 40)
        # Each function's process runs (gunicorn and its workers) and has answered: nothing in flight.
        for function in ("digits", "embed", "postprocess"):
            out.wait_for(rf"^cold start {function}-" if function != "embed" else r"^worker embed: started", 40)
        children = _descendants(process.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children]
        assert any(b"--listener-url" in c for c in commands) and any(b"platform" in c for c in commands)
        assert any(b"serve\x00digits" in c for c in commands)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        deadline = time.monotonic() + 60  # each drains gracefully (seconds; more on a loaded machine)
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children if _alive(pid)}
        assert left == {}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.fault
def test_up_on_a_cluster_whose_broker_dies_says_so_and_exits_1(tmp_path: Path) -> None:
    """An existing cluster (here a broker `up` did not start) that goes away: `up` reports the
    writer failed after UNREACHABLE_S and exits 1, without flooding its output with librdkafka's
    reconnect lines, and names the records it could not write."""
    from shared.eventing.broker_process import EmbeddedBroker

    broker = EmbeddedBroker()
    servers = broker.start().bootstrap_servers
    argv = ["up", "--bootstrap-servers", servers, "--samples", "0", "--ingress-port", "0"]
    process = start_up([*argv, "--state-file", str(tmp_path / "platform.json")])
    try:
        out = Output(process)
        out.wait_for(r"^READY$", 40)
        before = len(out.lines)
        broker.stop()
        out.wait_for(r"^up: kafka-writer failed \(no broker reachable for \d+ s\): stopping everything$", 40)
        assert process.wait(timeout=30) == 1
        with contextlib.suppress(AssertionError):
            out.wait_for(r"^never printed$", 1)  # read the rest of the output
        assert len(out.lines) - before < 60, "\n".join(out.lines[before:])
    finally:
        broker.stop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.fault
def test_up_on_a_cluster_whose_broker_restarts_empty_says_what_was_lost_and_exits_1(tmp_path: Path) -> None:
    """The same address answers again, with none of the topics: `up` does not carry on as if
    nothing happened; it names the lost topics and exits 1 within seconds."""
    from shared.eventing.broker_process import EmbeddedBroker

    broker = EmbeddedBroker()
    servers = broker.start().bootstrap_servers
    argv = ["up", "--bootstrap-servers", servers, "--samples", "0", "--no-functions", "--ingress-port", "0"]
    urls = [
        arg for name in ("digits", "embed", "postprocess") for arg in ("--function-url", f"{name}=http://127.0.0.1:9/")
    ]
    process = start_up([*argv, *urls, "--state-file", str(tmp_path / "platform.json")])
    try:
        out = Output(process)
        out.wait_for(r"^READY$", 40)
        broker.stop()
        broker.start()
        restarted = time.monotonic()
        out.wait_for(
            r"^up: kafka-writer failed \(.*topic\(s\) gone: .*onnxfn\.input.*restarted empty.*stopping everything$", 20
        )
        assert process.wait(timeout=30) == 1
        assert time.monotonic() - restarted < 20
    finally:
        broker.stop()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

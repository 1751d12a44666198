"""The embedded stand-in for KEDA's Kafka scaler: `onnxfn worker NAME` started on lag, stopped when idle.

For each Trigger annotated `onnxfn.dev/delivery: worker`, `onnxfn up` keeps one `WorkerScaler`.
Every `POLL_S` it reads the lag of the Trigger's consumer group on the broker topic (the end of
each partition minus the group's committed offset, as KEDA's `kafka` trigger does; records the
filter will skip count too, as there). With lag and no worker it starts one (through the one
supervisor, `ChildProcess`); after `idle_s` with no lag it stops it (SIGTERM: the worker drains
and commits). A worker that exits on its own is seen: it is started again from the committed
offsets (at-least-once) up to `MAX_RESTARTS` times, then reported failed, and `up` stops.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.eventing.broker_process import KafkaConfig
from shared.eventing.spec import TriggerSpec
from shared.health import FAILED, READY, STARTING, Health
from shared.supervisor import ChildExited, ChildProcess

log = logging.getLogger(__name__)
POLL_S = 0.2  # lag probes at zero (a burst waits at most this long for its worker to be launched)
RUNNING_POLL_S = 2.0  # while a worker runs, only its idleness is watched
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
MAX_RESTARTS = 3


def idle_window_s(config: Any) -> float:
    """How long a function's worker stays up with no lag: Knative's stable window plus the
    function's scale-to-zero retention, as its HTTP revision; KEDA's `cooldownPeriod` on a cluster."""
    from shared.service_files import DEFAULT_STABLE_WINDOW_S, parse_go_duration

    return DEFAULT_STABLE_WINDOW_S + parse_go_duration(config.scaling.retention_period)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class LagProbe:
    """The lag of one consumer group on one topic, read without joining the group: two requests a
    probe (the group's committed offsets, every partition's end offset), as it runs during bursts."""

    def __init__(self, kafka: KafkaConfig, group_id: str, topic: str) -> None:
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.topic = topic
        self._consumer = Consumer(kafka.consumer(group_id, **{"enable.auto.commit": False}))
        self._admin = AdminClient(kafka.admin())
        self._partitions: list[Any] | None = None

    def _offsets(self, partitions: list[Any], spec: Any, timeout_s: float) -> dict[int, int]:
        futures = self._admin.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout_s)
        return {tp.partition: future.result().offset for tp, future in futures.items()}

    def lag(self, timeout_s: float = 2.0) -> int | None:
        """Records after the committed offsets, as the broker counts them (None when it did not
        answer). Tansu 0.6 advances a partition's end offset by one per record batch."""
        from confluent_kafka import KafkaException, TopicPartition
        from confluent_kafka.admin import OffsetSpec  # type: ignore[attr-defined]

        try:
            if self._partitions is None:
                meta = self._consumer.list_topics(self.topic, timeout=timeout_s).topics[self.topic]
                if meta.error is not None:
                    return None
                self._partitions = [TopicPartition(self.topic, p) for p in sorted(meta.partitions)]
            committed = {tp.partition: tp.offset for tp in self._consumer.committed(self._partitions, timeout_s)}
            ends = self._offsets(self._partitions, OffsetSpec.latest(), timeout_s)  # type: ignore[no-untyped-call]
            unset = [tp for tp in self._partitions if committed[tp.partition] < 0]
            earliest = OffsetSpec.earliest()  # type: ignore[no-untyped-call]
            starts = self._offsets(unset, earliest, timeout_s) if unset else {}
            return sum(max(0, end - (committed[p] if committed[p] >= 0 else starts[p])) for p, end in ends.items())
        except KafkaException:
            return None

    def close(self) -> None:
        self._consumer.close()


class WorkerScaler:
    """Zero or one `onnxfn worker` process for one worker Trigger, driven by its group's lag."""

    def __init__(
        self,
        trigger: TriggerSpec,
        topic: str,
        kafka: KafkaConfig,
        eventing_dir: Path,
        knative_dir: Path | None,
        idle_s: float,
        say: Callable[[str], None] = print,
        env: dict[str, str] | None = None,
    ) -> None:
        assert trigger.subscriber.ref is not None
        self.function = trigger.subscriber.ref.name
        self.name = f"worker-{self.function}"
        self.trigger = trigger
        self.topic = topic
        self.kafka = kafka
        self.eventing_dir = eventing_dir
        self.knative_dir = knative_dir
        self.idle_s = idle_s
        self.say = say
        self.env = env
        self.process: ChildProcess | None = None
        self.restarts = 0
        self.starts = 0
        self.failure = ""
        self.last_lag: int | None = None
        self.cold_starts: list[float] = []  # process start to ready, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._probe: LagProbe | None = None

    # -- one worker process ---------------------------------------------------------------------
    def _argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "shared.cli", "worker", self.function, "--eventing", str(self.eventing_dir)]
        if self.knative_dir is not None:
            argv += ["--knative", str(self.knative_dir)]
        # The one consumer of its group here: no group join at a cold start (see KafkaWorker).
        argv += ["--bootstrap-servers", self.kafka.bootstrap_servers, "--assign-all"]
        return [*argv, "--host", "127.0.0.1", "--port", str(port)]

    def _launch(self, lag: int) -> None:
        port = _free_port()
        log_path = Path(tempfile.gettempdir()) / f"onnxfn-up-{self.name}-{os.getpid()}.log"
        env = {**os.environ, **(self.env or {})}
        self.process = ChildProcess(self.name, self._argv(port), env=env, log=log_path, append=True).start()
        self.starts += 1
        url = f"http://127.0.0.1:{port}/health/readiness"
        try:
            ready_s = self.process.wait_until(
                lambda: self._stop.is_set() or _answers(url), READY_TIMEOUT_S, poll_s=0.05
            )
        except (ChildExited, TimeoutError) as exc:
            self._exited(str(exc).splitlines()[0])
            return
        if self._stop.is_set():
            return
        self.cold_starts.append(ready_s)
        self.say(f"worker {self.function}: started on lag {lag}, ready in {ready_s:.2f} s")

    def _exited(self, reason: str) -> None:
        """The worker ended without being asked: start again from the committed offsets, or give up."""
        self.process = None
        if self.restarts >= MAX_RESTARTS:
            self.failure = f"{reason}; not restarted after {self.restarts} restarts"
            return
        self.restarts += 1
        log.error("%s: %s; starting it again from the committed offsets", self.name, reason)
        self.say(f"worker {self.function}: {reason}; restart {self.restarts} of {MAX_RESTARTS}")

    def _halt(self, why: str) -> None:
        if self.process is None:
            return
        code = self.process.stop(timeout_s=STOP_TIMEOUT_S)
        self.process = None
        self.say(f"worker {self.function}: stopped ({why}, exit {code})")

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._probe is not None
        idle_since: float | None = None
        while not self._stop.wait(POLL_S if self.process is None else RUNNING_POLL_S):
            if self.failure:
                continue
            if self.process is not None and not self.process.alive:
                self._exited(f"exited with code {self.process.returncode}")
                continue
            lag = self._probe.lag()
            self.last_lag = lag
            if lag is None:
                continue
            if lag > 0:
                idle_since = None
                if self.process is None:
                    self._launch(lag)
                continue
            if self.process is None:
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since >= self.idle_s:
                self._halt(f"no lag for {self.idle_s:g} s")
                idle_since = None
        self._halt("up stopping")
        self._probe.close()

    def start(self, timeout_s: float = 10.0) -> WorkerScaler:
        """Start watching, once the first lag probe has answered (its client is connected and knows
        the group's coordinator, so a burst right after `up` is READY waits no longer than POLL_S)."""
        self._probe = LagProbe(self.kafka, self.trigger.group_id, self.topic)
        deadline = time.monotonic() + timeout_s
        while (lag := self._probe.lag()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        self.last_lag = lag
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT_S + 5)

    def health(self) -> Health:
        running = self.process is not None and self.process.alive
        detail = f"{'running' if running else 'at zero'}; lag {self.last_lag}; starts {self.starts}"
        if self.failure:
            return Health(self.name, FAILED, self.failure, restarts=self.restarts)
        return Health(self.name, READY if self._thread.is_alive() else STARTING, detail, restarts=self.restarts)

    def status(self) -> dict[str, Any]:
        """For `onnxfn status`-like output and the benchmarks."""
        return {"function": self.function, "running": self.process is not None, "cold_starts": self.cold_starts}

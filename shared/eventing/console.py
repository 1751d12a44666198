"""The live console of `onnxfn up`: one page, and the JSON it polls every second.

GET `/` is the page (plain HTML and JavaScript, nothing to build); GET `/api/state` is what it
shows: the functions with their revisions, traffic split, tags and processes (from the platform's
`/status`), processes over time, the last cold start of each revision with its parts, events per
second and consumer lag per trigger, the dead letters with their reasons, and the recent traces.
POST `/api/republish` with `{"id": ...}` sends a dead-lettered event back into the broker (its
`knativeerror*` extensions removed, its id kept so consumers that deduplicate still can).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson

from shared import tracing
from shared.events import Event

log = logging.getLogger(__name__)
HISTORY = 120  # points kept per series (one a second)
DEAD_LETTERS_KEPT = 50
TRACES_SHOWN = 3
MAX_REQUEST_BYTES = 4096


def page() -> bytes:
    """The console page (`console.html`, package data beside this module)."""
    from importlib.resources import files

    return files("shared.eventing").joinpath("console.html").read_bytes()


class TriggerCounter:
    """Outcomes of one trigger's deliveries (the sender's `on_outcome` hook), read as rates."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0

    def __call__(self, _event: Event, outcome: Any) -> None:
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1


class ConsoleState:
    """What the page shows, gathered once a second in a thread of `up`."""

    def __init__(
        self,
        plane: Any,
        kafka: Any,
        platform_status: Callable[[], dict[str, Any]] | None,
        trace_dir: Path | None,
        broker: Any,
    ) -> None:
        from shared.eventing.sink import TopicTarget

        self.platform_status = platform_status
        self.trace_dir = trace_dir
        self.broker = broker  # TopicTarget of the broker topic re-published events go to
        self.kafka = kafka
        self.counters: dict[str, TriggerCounter] = {}
        self.groups: dict[str, tuple[str, str]] = {}  # trigger -> (consumer group, topic)
        for name, sender in plane.senders.items():
            if name.startswith("Trigger/"):
                counter = TriggerCounter()
                previous = sender.on_outcome
                sender.on_outcome = counter if previous is None else _both(previous, counter)
                self.counters[name] = counter
        for trigger in plane.spec.triggers:
            broker_spec = plane.spec.brokers.get(f"{trigger.namespace}/{trigger.broker}")
            if broker_spec is not None:  # a worker Trigger's lag too (its worker reports its own rates)
                self.groups[f"Trigger/{trigger.name}"] = (trigger.group_id, broker_spec.topic)
        self.dead_letter_topics = sorted(
            {
                s.dead_letter_target.topic
                for s in plane.senders.values()
                if isinstance(s.dead_letter_target, TopicTarget)
            }
        )
        self.dead_letters: collections.deque[dict[str, Any]] = collections.deque(maxlen=DEAD_LETTERS_KEPT)
        self._events: dict[str, Event] = {}
        self.rates: dict[str, collections.deque[tuple[float, float]]] = {}
        self.replicas: dict[str, collections.deque[tuple[float, int]]] = {}
        self.lags: dict[str, int | None] = {}
        self.snapshot: dict[str, Any] = {"at": time.time(), "functions": [], "triggers": []}
        self._last: dict[str, tuple[float, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._lock = threading.Lock()

    # -- gathering ----------------------------------------------------------------------------------
    def _run(self) -> None:
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        from shared.eventing.worker_scaler import LagProbe

        probes = {name: LagProbe(self.kafka, group, topic) for name, (group, topic) in self.groups.items()}
        reader = Consumer(self.kafka.consumer("onnxfn-up-console"))
        if self.dead_letter_topics:
            meta = reader.list_topics(timeout=10)
            reader.assign(
                [TopicPartition(t, p, OFFSET_END) for t in self.dead_letter_topics for p in meta.topics[t].partitions]
            )
        tick = 0
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                if tick % 2 == 0:
                    self.lags = {name: probe.lag(timeout_s=1.0) for name, probe in probes.items()}
                if self.dead_letter_topics:
                    self._read_dead_letters(reader)
                self._gather()
                tick += 1
                self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))
        finally:
            for probe in probes.values():
                probe.close()
            reader.close()

    def _read_dead_letters(self, reader: Any) -> None:
        from shared.eventing.kafka_binding import from_record

        for message in reader.consume(100, 0.05):
            if message.error() is not None:
                continue
            try:
                event = from_record(message.headers(), message.value())
            except Exception as exc:  # a record that is no CloudEvent is shown as such
                self.dead_letters.appendleft({"id": "", "type": "", "reason": f"not a CloudEvent: {exc}"})
                continue
            code = event.get("knativeerrorcode")
            reason = f"HTTP {code}" if code else "no answer"
            detail = _error_detail(event.get("knativeerrordata"))
            with self._lock:
                self._events[event.id] = event
                self.dead_letters.appendleft(
                    {
                        "id": event.id,
                        "type": event.type,
                        "destination": event.get("knativeerrordest", ""),
                        "reason": f"{reason}: {detail}" if detail else reason,
                        "at": message.timestamp()[1] / 1000,
                        "topic": message.topic(),
                    }
                )
                known = {d["id"] for d in self.dead_letters}
                self._events = {k: v for k, v in self._events.items() if k in known}

    def _gather(self) -> None:
        now = time.time()
        triggers: list[dict[str, Any]] = []
        for name in [n for n in self.groups if n not in self.counters]:  # worker Triggers
            triggers.append({"name": f"{name} (worker)", "events_per_s": None, "delivered": None, "failed": None,
                             "lag": self.lags.get(name), "history": []})  # fmt: skip
        for name, counter in self.counters.items():
            done = counter.ok + counter.failed
            then, before = self._last.get(name, (now, done))
            rate = (done - before) / (now - then) if now > then else 0.0
            self._last[name] = (now, done)
            series = self.rates.setdefault(name, collections.deque(maxlen=HISTORY))
            series.append((now, round(rate, 1)))
            triggers.append(
                {
                    "name": name,
                    "events_per_s": round(rate, 1),
                    "delivered": counter.ok,
                    "failed": counter.failed,
                    "lag": self.lags.get(name),
                    "history": list(series),
                }
            )
        functions = self._functions(now)
        traces = self._traces()
        with self._lock:
            dead = list(self.dead_letters)
        self.snapshot = {
            "at": now,
            "functions": functions,
            "triggers": triggers,
            "dead_letters": dead,
            "traces": traces,
        }

    def _functions(self, now: float) -> list[dict[str, Any]]:
        if self.platform_status is None:
            return []
        try:
            status = self.platform_status()
        except Exception as exc:  # the platform may be restarting: say so on the page
            return [{"name": "platform", "error": str(exc), "revisions": [], "traffic": []}]
        functions = []
        for service in status.get("services", []):
            revisions = []
            for revision in service["revisions"]:
                name = revision["revision"]
                series = self.replicas.setdefault(name, collections.deque(maxlen=HISTORY))
                series.append((now, len(revision["processes"])))
                revisions.append(
                    {
                        "name": name,
                        "model_version": revision["model_version"],
                        "processes": len(revision["processes"]),
                        "ready": sum(1 for p in revision["processes"] if p["ready"]),
                        "inflight": revision["inflight"],
                        "waiting": revision["waiting"],
                        "last_cold_start": revision["last_cold_start"],
                        "history": list(series),
                    }
                )
            functions.append(
                {"name": service["name"], "url": service["url"], "traffic": service["traffic"], "revisions": revisions}
            )
        return functions

    def _traces(self) -> list[dict[str, Any]]:
        if self.trace_dir is None or not self.trace_dir.is_dir():
            return []
        shown = []
        for trace_id, spans in list(tracing.traces(tracing.read_spans(self.trace_dir)).items())[:TRACES_SHOWN]:
            t0 = min(s["start_ns"] for s in spans)
            ids = {s["span_id"]: s for s in spans}
            rows = []
            for span in spans:
                depth, parent = 0, span["parent_id"]
                while parent in ids and depth < 20:
                    depth, parent = depth + 1, ids[parent]["parent_id"]
                rows.append(
                    {
                        "name": span["name"],
                        "service": span["service"],
                        "start_ms": (span["start_ns"] - t0) / 1e6,
                        "ms": (span["end_ns"] - span["start_ns"]) / 1e6,
                        "depth": depth,
                        "error": span["error"],
                    }
                )
            total = max(s["end_ns"] for s in spans) - t0
            shown.append({"trace_id": trace_id, "total_ms": total / 1e6, "spans": _tree_order(rows, spans)})
        return shown

    # -- actions ------------------------------------------------------------------------------------
    def republish(self, event_id: str) -> tuple[int, str]:
        """Send a dead-lettered event back into the broker; (HTTP status, message)."""
        with self._lock:
            event = self._events.get(event_id)
        if event is None:
            return 404, f"no dead letter {event_id!r} here (only the last {DEAD_LETTERS_KEPT} are kept)"
        attributes = {k: v for k, v in event.attributes.items() if not k.startswith("knativeerror")}
        try:
            self.broker.send_and_wait(Event(attributes, event.data, _raw=event._raw))
        except Exception as exc:
            return 503, f"the broker did not take it: {exc}"
        with self._lock:
            for entry in self.dead_letters:
                if entry["id"] == event_id:
                    entry["republished"] = time.time()
        return 202, f"{event_id} re-published to {self.broker.topic}"

    def start(self) -> ConsoleState:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _both(first: Callable[[Event, Any], None], second: Callable[[Event, Any], None]) -> Callable[[Event, Any], None]:
    def both(event: Event, outcome: Any) -> None:
        first(event, outcome)
        second(event, outcome)

    return both


def _error_detail(data: Any) -> str:
    """`knativeerrordata` (base64 of the subscriber's answer) as short text."""
    import base64
    import binascii

    if not data:
        return ""
    try:
        text = base64.b64decode(str(data), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        text = str(data)
    try:
        message = orjson.loads(text).get("message")
        text = str(message) if message else text
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return text[:300]


def _tree_order(rows: list[dict[str, Any]], spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in waterfall order: each span followed by its children (by start)."""
    by_parent: dict[Any, list[int]] = {}
    ids = {s["span_id"] for s in spans}
    for index, span in enumerate(spans):
        by_parent.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(index)
    ordered: list[dict[str, Any]] = []

    def walk(parent: Any) -> None:
        for index in by_parent.get(parent, []):
            ordered.append(rows[index])
            walk(spans[index]["span_id"])

    walk(None)
    return ordered


class ConsoleServer:
    """The console's HTTP server on `host:port` (a thread of `up`)."""

    def __init__(self, state: ConsoleState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        handler = type("ConsoleHandler", (_Handler,), {"state": state})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="console-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def start(self) -> ConsoleServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    state: ConsoleState
    server_version = "onnxfn-console"

    def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/", "/index.html"):
            self._answer(200, page(), "text/html; charset=utf-8")
        elif self.path == "/api/state":
            self._answer(200, orjson.dumps(self.state.snapshot))
        else:
            self._answer(404, b'{"message": "not found"}')

    def do_POST(self) -> None:
        if self.path != "/api/republish":
            self._answer(404, b'{"message": "not found"}')
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 < length <= MAX_REQUEST_BYTES:
            self._answer(400 if length <= 0 else 413, b'{"message": "send {\\"id\\": ...} (at most 4 KiB)"}')
            return
        try:
            event_id = str(orjson.loads(self.rfile.read(length))["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._answer(400, b'{"message": "send {\\"id\\": \\"<dead letter id>\\"}"}')
            return
        status, message = self.state.republish(event_id)
        self._answer(status, orjson.dumps({"status": status, "message": message}))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("console: " + format, *args)

"""`onnxfn bench-events`: the event path's throughput and latency, in one run.

1. Raw broker: produce N records of 300 bytes to a fresh topic, then consume them (records/s each):
   the ceiling for anything built on the broker.
2. Pipeline: `onnxfn up` (event plane and functions, in their own processes) on the same broker; digits
   request events (held-out images) produced on the input topic, latency measured from produce to
   arrival on the digits result topic, first a burst with every function at zero (cold
   starts), then at a steady rate, then at full speed; duplicates are counted.

Prints a table and writes JSON (`--json`).

`--soak SECONDS --rate R`: the pipeline part alone, paced at R events/s for SECONDS, with a line per
window (`--window`, 30 s): arrivals and their p50/p99 latency, the broker's CPU and RSS, the plane's
RSS; at the end, how many never arrived (in 30 s without progress) and how many arrived twice.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from shared.eventing.cliutil import add_bootstrap
from shared.eventing.dispatcher import take

RESULT_TOPIC = "onnxfn.digits.results"
INPUT_TOPIC = "onnxfn.input"
WARM_UP_TOPIC = "onnxfn.bench.warm-up"  # read by nothing: the producer's first write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_bootstrap(parser)
    parser.add_argument("--raw-records", type=int, default=200_000, help="records for the raw broker test")
    parser.add_argument("--rate", type=float, default=200.0, help="steady rate, events/s")
    parser.add_argument("--steady-seconds", type=float, default=15.0, help="duration of the steady phase")
    parser.add_argument("--burst", type=int, default=10_000, help="events in the full-speed phase")
    parser.add_argument(
        "--cold-burst", type=int, default=2000, help="events produced at once while every function is at zero"
    )
    parser.add_argument(
        "--mode",
        choices=("http", "worker"),
        default="http",
        help="worker: the HTTP-trigger path and `onnxfn worker` side by side, digits and embed (bench_paths)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="--mode worker: rounds, the paths alternating")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="soak at --rate for SECONDS instead")
    parser.add_argument("--window", type=float, default=30.0, help="soak: seconds per reported window")
    parser.add_argument("--plot", action="store_true", help="soak: also write a PNG of latency over the soak")
    parser.add_argument(
        "--json", type=Path, default=Path("bench-results/bench-events.json"), help="where to write results"
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def raw_broker(kafka: Any, records: int) -> dict[str, float]:
    """Produce then consume `records` 300-byte records on a fresh 4-partition topic."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    from shared.eventing.broker_process import ensure_topics

    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka, {topic: (4, 1)})
    producer = Producer(kafka.producer(**{"linger.ms": 5, "batch.num.messages": 10000}))
    value = b"x" * 300
    start = time.perf_counter()
    for _ in range(records):
        while True:
            try:
                producer.produce(topic, value=value)
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)
    produce_s = time.perf_counter() - start
    consumer = Consumer(kafka.consumer(f"bench-raw-{uuid.uuid4().hex[:8]}"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(4)])
    seen = 0
    start = time.perf_counter()
    deadline = start + 120
    while seen < records and time.perf_counter() < deadline:
        seen += sum(1 for m in consumer.consume(10000, 0.5) if m.error() is None)
    consume_s = time.perf_counter() - start
    consumer.close()
    return {"records": records, "produce_per_s": records / produce_s, "consume_per_s": seen / consume_s}


class Arrivals:
    """Records the arrival time of each `requestid` on the result topic (from its current end)."""

    def __init__(self, kafka: Any, topic: str, type_: str | None = None):
        """`type_`: count only records of that CloudEvent type (a broker topic carries every kind)."""
        import threading

        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        self.consumer = Consumer(kafka.consumer("bench-arrivals"))
        meta = self.consumer.list_topics(topic, timeout=10)
        self.consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in meta.topics[topic].partitions])
        self.type = type_.encode() if type_ else None
        self.seen: dict[str, float] = {}
        self.copies: dict[str, int] = {}  # requestid -> how many results carried it
        self.order: list[tuple[float, str]] = []  # (arrival, requestid) of first arrivals
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            for message in take(self.consumer, 0.05):
                if message.error() is not None:
                    continue
                now = time.perf_counter()
                headers = message.headers() or ()
                if self.type is not None and (b"ce_type", self.type) not in [(n.encode(), v) for n, v in headers]:
                    continue
                for name, value in headers:
                    if name == "ce_requestid" and isinstance(value, bytes):
                        request_id = value.decode()
                        self.copies[request_id] = self.copies.get(request_id, 0) + 1
                        if request_id not in self.seen:
                            self.seen[request_id] = now
                            self.order.append((now, request_id))
        self.consumer.close()

    def wait_for(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(i not in self.seen for i in ids):
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _requests(count: int, function: str = "digits") -> list[tuple[str, bytes | None, bytes | None, Any]]:
    """(id, key, value, headers) of `count` request records: digits cycling over held-out images;
    embed with the sentence raw onnxruntime is measured on (the plug-in's example)."""
    from shared.contract import load_handler
    from shared.eventing.kafka_binding import to_record
    from shared.eventing.up import sample_events
    from shared.events import new_event

    if function == "digits":
        templates = sample_events(["digits"], 450)
    else:
        handler = load_handler(function)
        templates = [new_event(handler.config.accepts[0], "/onnxfn/bench", handler.example())]
    out = []
    for i in range(count):
        template = templates[i % len(templates)]
        attributes = {**template.attributes, "id": f"bench-{time.time_ns()}-{i}", "partitionkey": f"k{i % 64}"}
        event = type(template)(attributes, template.data)
        key, value, headers = to_record(event)
        out.append((event.attributes["id"], key, value, headers))
    return out


def _wait_until(producer: Any, due: float) -> float:
    """Serve the producer's callbacks until `due` (perf_counter); returns the time then."""
    while (now := time.perf_counter()) < due:
        time.sleep(min(due - now, 0.002))
        producer.poll(0)
    return now


def ready_producer(kafka: Any) -> Any:
    """A producer with its connection and idempotent-producer handshake done (one record to a topic
    of its own acknowledged), so the first timed send is not charged ~0.5 s of producer start."""
    from confluent_kafka import Producer

    from shared.eventing.broker_process import ensure_topics

    ensure_topics(kafka, {WARM_UP_TOPIC: (1, 1)})
    producer = Producer(kafka.producer(**{"linger.ms": 0}))
    producer.produce(WARM_UP_TOPIC, b"warm-up")
    if producer.flush(30) != 0:
        raise RuntimeError(f"the benchmark's producer could not write to {WARM_UP_TOPIC} in 30 s")
    return producer


def _produce(producer: Any, key: bytes | None, value: bytes | None, headers: Any, topic: str = INPUT_TOPIC) -> None:
    """One record to the input topic (or `topic`), waiting while the producer's queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers)
            return
        except BufferError:
            producer.poll(0.005)


def pipeline_phase(
    producer: Any,
    arrivals: Arrivals,
    count: int,
    rate: float | None,
    function: str | None = None,
    topic: str = INPUT_TOPIC,
) -> dict[str, Any]:
    """Produce `count` digits requests (paced at `rate`/s, or as fast as possible) and measure them.
    The producer is created (and its idempotent-producer handshake done) before, not in the timing.
    With `function`, that function's requests, and the ids in the result (`ids`)."""
    records = _requests(count, function or "digits")
    sent: dict[str, float] = {}
    started_at, start = time.time(), time.perf_counter()
    for index, (event_id, key, value, headers) in enumerate(records):
        if rate:
            _wait_until(producer, start + index / rate)
        _produce(producer, key, value, headers, topic)
        sent[event_id] = time.perf_counter()
        producer.poll(0)
    producer.flush(30)
    produced_s = time.perf_counter() - start
    ids = list(sent)
    arrivals.wait_for(ids, timeout_s=60 + count / 200)
    got = [i for i in ids if i in arrivals.seen]
    latencies = [(arrivals.seen[i] - sent[i]) * 1000 for i in got]
    last = max((arrivals.seen[i] for i in got), default=start)
    return {
        **({"ids": ids} if function else {}),
        "first_ms": min(latencies, default=float("nan")),
        "started_at": started_at,
        "events": count,
        "arrived": len(got),
        "offered_per_s": count / max(produced_s, 1e-9),
        "events_per_s": len(got) / max(last - start, 1e-9),
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }


def soak(
    producer: Any,
    arrivals: Arrivals,
    seconds: float,
    rate: float,
    window_s: float,
    broker_pid: int | None,
    plane_pid: int,
) -> dict[str, Any]:
    """Produce digits requests at `rate`/s for `seconds`; a line per window while it runs, then wait
    for the stragglers (until nothing new arrives for 30 s) and count what is missing or doubled."""
    from shared.bench.hey import tree_cpu_seconds
    from shared.process import rss_mb

    total = int(seconds * rate)
    records = _requests(total)
    sent: dict[str, float] = {}
    windows: list[dict[str, Any]] = []
    start = time.perf_counter()
    window_start, seen_until = start, len(arrivals.order)
    cpu_before = tree_cpu_seconds(broker_pid) if broker_pid else 0.0

    def close_window(now: float) -> None:
        nonlocal window_start, seen_until, cpu_before
        arrived = arrivals.order[seen_until:]
        seen_until += len(arrived)
        latencies = [(at - sent[i]) * 1000 for at, i in arrived if i in sent]
        cpu = tree_cpu_seconds(broker_pid) if broker_pid else 0.0
        row = {
            "until_s": round(now - start, 1),
            "sent": sum(1 for t in sent.values() if window_start <= t < now),
            "arrived": len(arrived),
            "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99),
            "behind": len(sent) - len(arrivals.seen.keys() & sent.keys()),
            "broker_cpu_pct": 100 * (cpu - cpu_before) / max(now - window_start, 1e-9) if broker_pid else None,
            "broker_rss_mb": rss_mb(broker_pid) if broker_pid else None,
            "plane_rss_mb": rss_mb(plane_pid),
        }
        windows.append(row)
        broker = f"broker {row['broker_cpu_pct']:5.1f}% CPU {row['broker_rss_mb']:6.1f} MB  " if broker_pid else ""
        stalled = "  STALLED: nothing arrived" if row["sent"] and not row["arrived"] else ""
        print(
            f"{row['until_s']:7.1f} s  sent {row['sent']:6d}  arrived {row['arrived']:6d}  "
            f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  behind {row['behind']:6d}  "
            f"{broker}plane {row['plane_rss_mb']:6.1f} MB{stalled}",
            flush=True,
        )
        window_start, cpu_before = now, cpu

    for index, (event_id, key, value, headers) in enumerate(records):
        now = _wait_until(producer, start + index / rate)
        if now - window_start >= window_s:
            close_window(now)
        _produce(producer, key, value, headers)
        sent[event_id] = time.perf_counter()
    producer.flush(30)
    close_window(time.perf_counter())
    print("waiting for what is still on its way ...", flush=True)
    last_progress, count = time.perf_counter(), len(arrivals.seen)
    while any(i not in arrivals.seen for i in sent) and time.perf_counter() - last_progress < 30:
        time.sleep(0.2)
        if len(arrivals.seen) != count:
            last_progress, count = time.perf_counter(), len(arrivals.seen)
    close_window(time.perf_counter())
    missing = [i for i in sent if i not in arrivals.seen]
    latencies = [(arrivals.seen[i] - sent[i]) * 1000 for i in sent if i in arrivals.seen]
    return {
        "seconds": seconds,
        "rate": rate,
        "events": total,
        "arrived": total - len(missing),
        "not_arrived": len(missing),
        "not_arrived_ids": missing[:20],
        "duplicates": sum(arrivals.copies.get(i, 0) - 1 for i in sent if arrivals.copies.get(i, 0) > 1),
        "p50_ms": _percentile(latencies, 50),
        "p99_ms": _percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "worst_window_p99_ms": max((w["p99_ms"] for w in windows if w["arrived"]), default=float("nan")),
        "stalled_windows": sum(1 for w in windows if w["sent"] and not w["arrived"]),
        "windows": windows,
    }


def _start_plane(servers: str) -> Any:
    import subprocess

    command = [sys.executable, "-m", "shared.cli", "up", "--bootstrap-servers", servers]
    command += ["--samples", "0", "--quiet", "--ingress-port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if line.strip() == "READY":
            return process
    raise RuntimeError(f"onnxfn up exited with {process.wait()} before it was ready")


def run_soak(args: argparse.Namespace) -> int:
    """`--soak`: the pipeline at a steady rate for a long time; exit 1 if anything was lost or doubled."""
    import signal

    import orjson
    from confluent_kafka import Producer

    from shared.eventing.cliutil import connect

    broker = plane = arrivals = None
    try:
        kafka, broker = connect(args.bootstrap_servers)
        print("starting the event plane and functions (onnxfn up) ...", flush=True)
        plane = _start_plane(kafka.bootstrap_servers)
        arrivals = Arrivals(kafka, RESULT_TOPIC)
        producer = Producer(kafka.producer(**{"linger.ms": 0}))
        pipeline_phase(producer, arrivals, 300, None)  # warm-up: connections, producer id, caches
        print(f"soak: {args.rate:.0f} digits events/s for {args.soak:.0f} s, a line per {args.window:.0f} s")
        broker_pid = broker.child.pid if broker is not None and broker.child is not None else None
        report = soak(producer, arrivals, args.soak, args.rate, args.window, broker_pid, plane.pid)
    finally:
        if arrivals is not None:
            arrivals.stop()
        if plane is not None:
            plane.send_signal(signal.SIGTERM)
            plane.wait(timeout=60)
        if broker is not None:
            broker.stop()
    print(
        f"\nsoak {report['events']} events: not arrived {report['not_arrived']}, duplicates {report['duplicates']}, "
        f"p50 {report['p50_ms']:.1f} ms, p99 {report['p99_ms']:.1f} ms, worst window p99 "
        f"{report['worst_window_p99_ms']:.1f} ms, stalled windows {report['stalled_windows']}"
    )
    report["broker"] = "embedded Tansu" if broker else kafka.bootstrap_servers
    path = args.json.with_name(args.json.stem + "-soak.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}")
    if args.plot:
        from shared.bench.plots import plot

        print("\n".join(f"wrote {png}" for png in plot(report, path)))
    return 0 if report["not_arrived"] == 0 and report["duplicates"] == 0 else 1


def run(args: argparse.Namespace) -> int:
    if args.soak:
        return run_soak(args)
    if args.mode == "worker":
        from shared.eventing import bench_paths

        return bench_paths.run(args)
    import os
    import platform
    import signal

    import orjson

    from shared.eventing.cliutil import connect

    broker = None
    plane = None
    try:
        kafka, broker = connect(args.bootstrap_servers)
        print(f"raw broker: {args.raw_records} records of 300 bytes ...", flush=True)
        raw = raw_broker(kafka, args.raw_records)
        print("starting the event plane and functions (onnxfn up) ...", flush=True)
        plane = _start_plane(kafka.bootstrap_servers)
        arrivals = Arrivals(kafka, RESULT_TOPIC)
        producer = ready_producer(kafka)
        print(f"cold burst: {args.cold_burst} digits events with every function at zero ...", flush=True)
        cold = pipeline_phase(producer, arrivals, args.cold_burst, None)
        pipeline_phase(producer, arrivals, 300, None)  # warm-up: connections, producer id, caches
        steady_count = int(args.rate * args.steady_seconds)
        print(f"steady: {steady_count} digits events at {args.rate:.0f}/s ...", flush=True)
        steady = pipeline_phase(producer, arrivals, steady_count, args.rate)
        print(f"full speed: {args.burst} digits events ...", flush=True)
        burst = pipeline_phase(producer, arrivals, args.burst, None)
        arrivals.stop()
        duplicates = sum(n - 1 for n in arrivals.copies.values())
    finally:
        if plane is not None:
            plane.send_signal(signal.SIGTERM)
            plane.wait(timeout=60)
        if broker is not None:
            broker.stop()
    rows = [
        ("raw broker produce", f"{raw['produce_per_s']:,.0f} records/s", "", ""),
        ("raw broker consume", f"{raw['consume_per_s']:,.0f} records/s", "", ""),
        ("digits cold burst", f"{cold['events_per_s']:,.0f} events/s",
         f"{cold['p50_ms']:.1f} ms", f"{cold['p99_ms']:.1f} ms"),
        (f"digits e2e @ {args.rate:.0f}/s", f"{steady['events_per_s']:,.0f} events/s",
         f"{steady['p50_ms']:.1f} ms", f"{steady['p99_ms']:.1f} ms"),
        ("digits e2e full speed", f"{burst['events_per_s']:,.0f} events/s",
         f"{burst['p50_ms']:.1f} ms", f"{burst['p99_ms']:.1f} ms"),
    ]  # fmt: skip
    print(f"\n{'phase':<24} {'throughput':>20} {'p50':>10} {'p99':>10}")
    for name, rate, p50, p99 in rows:
        print(f"{name:<24} {rate:>20} {p50:>10} {p99:>10}")
    lost = sum(phase["events"] - phase["arrived"] for phase in (cold, steady, burst))
    print(f"not arrived: {lost}, arrived twice: {duplicates}")
    targets = {
        "throughput_ge_1000_per_s": burst["events_per_s"] >= 1000,
        "p99_lt_50ms_at_200_per_s": steady["p99_ms"] < 50,
        "nothing_lost": lost == 0,
        "no_duplicates": duplicates == 0,
    }
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "broker": "embedded Tansu" if broker else kafka.bootstrap_servers,
        "raw": raw,
        "cold_burst": cold,
        "duplicates": duplicates,
        "steady": steady,
        "full_speed": burst,
        "targets": targets,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {args.json}")
    return 0

"""`onnxfn up`: broker, event plane and functions on this machine, from `eventing/` (what `make run` does).

It starts an embedded Tansu broker (or uses `--bootstrap-servers` / `KAFKA_BOOTSTRAP_SERVERS`), the
scale-to-zero platform (`onnxfn platform` as a child process: one activator URL per Knative Service the triggers deliver
to, every function at zero until its first event) and the event plane; prints the broker ingress URL,
the Service and tag URLs and the topics; publishes a sample stream (held-out digits images and a few
sentences) to the input topic; prints results as they arrive on the KafkaSink topics, each cold start
as it happens and each revision going back to zero after the idle window (`onnxfn status` shows the
same); and serves until Ctrl-C or SIGTERM, then shuts everything down.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.eventing.cliutil import add_bootstrap
from shared.health import FAILED, READY, Health
from shared.platform.cli import add_scaling_arguments
from shared.platform.platform import default_state_file, plane_state_file
from shared.stop_signal import StopSignal

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eventing", type=Path, default=ROOT / "eventing", help="folder of eventing YAML")
    parser.add_argument("--knative", type=Path, default=ROOT / "knative", help="folder of Knative Services")
    add_bootstrap(parser)
    parser.add_argument("--ingress-port", type=int, default=8090, help="broker ingress port (0: any free port)")
    parser.add_argument(
        "--function-url", action="append", default=[], metavar="NAME=URL", help="use a running function"
    )
    parser.add_argument("--no-functions", action="store_true", help="no platform: every subscriber is a --function-url")
    parser.add_argument(
        "--gateway-port", type=int, default=0, help="platform gateway port (Host routing, /status; 0: any free port)"
    )
    parser.add_argument(
        "--state-file", type=Path, default=default_state_file(), help="where to say the gateway URL (onnxfn status)"
    )
    add_scaling_arguments(parser)
    parser.add_argument("--samples", type=int, default=20, help="sample events per entry function (0: none)")
    parser.add_argument("--quiet", action="store_true", help="do not print results as they arrive")
    parser.add_argument(
        "--traces",
        type=Path,
        default=None,
        help="where every process keeps its recent spans (default: beside --state-file; `onnxfn traces` reads them)",
    )
    parser.add_argument("--no-traces", action="store_true", help="record no spans (unless OTEL_EXPORTER_OTLP_ENDPOINT)")
    parser.add_argument("--console-port", type=int, default=0, help="port of the live console (0: any free port)")
    parser.add_argument("--no-console", action="store_true", help="serve no console")


def trace_dir_of(state_file: Path) -> Path:
    """Where an `onnxfn up` with this state file keeps spans by default."""
    return state_file.with_name(state_file.stem + "-traces")


def set_up_tracing(args: argparse.Namespace) -> Path | None:
    """Every process `up` starts records spans (10% of new traces unless OTEL_TRACES_SAMPLER_ARG
    says otherwise; every trace whose incoming traceparent is sampled) into one folder, exported
    every 0.5 s so the traces are there to read while events flow."""
    from shared import tracing

    if args.no_traces:
        os.environ.pop(tracing.TRACE_DIR_ENV, None)
        return None
    directory = args.traces or trace_dir_of(args.state_file)
    os.environ[tracing.TRACE_DIR_ENV] = str(directory)
    os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "500")
    tracing.configure("onnxfn-plane")
    return directory


def entry_functions(loaded: Any) -> list[str]:
    """The functions whose request types no other function of the spec answers with (where a
    stream starts: digits and embed here, not postprocess)."""
    from shared.contract import load_handler

    configs = {name: load_handler(name).config for name in loaded.functions()}
    produced = {t for config in configs.values() for t in config.result_types}
    return [name for name, config in configs.items() if not set(config.accepts) & produced]


def sample_events(functions: list[str], count: int) -> list[Any]:
    """`count` request events for each function, from its plug-in's `samples` (with their
    attributes, such as digits' `expected` label)."""
    from shared.contract import load_handler, samples
    from shared.events import new_event

    events = []
    for name in functions:
        handler = load_handler(name)
        for i, (data, attributes) in enumerate(samples(handler, count)):
            event = new_event(handler.config.accepts[0], "/onnxfn/up", data, {"partitionkey": f"{name}-{i}"})
            event.attributes.update(attributes)
            events.append(event)
    return events


def summary(event: Any) -> str:
    """One short line per result event."""
    data = event.data if isinstance(event.data, dict) else {}
    extra = event.get("knativeerrorcode")
    if extra:
        return f"error {extra} from {event.get('knativeerrordest')}"
    if "label" in data:
        probs = data.get("probabilities") or []
        top = max(probs) if probs else 0.0
        return f"label {data['label']} (p={top:.3f})"
    if "embedding" in data:
        return f"embedding[{len(data['embedding'])}]"
    keys = ", ".join(sorted(data)[:4])
    return f"{{{keys}}}" if keys else ""


def cold_start_line(revision: str, cold: dict[str, Any]) -> str:
    """`cold start digits-v1: 0.31 s (process 0.20, load 0.01, ...)` from a revision's `last_cold_start`."""
    parts = cold.get("parts") or {}
    named = (
        ("process", "process_start"),
        ("load", "model_load"),
        ("warm-up", "warmup"),
        ("ready probe", "ready_detect"),
        ("first inference", "first_inference"),
    )
    detail = ", ".join(f"{label} {parts[key]:.2f}" for label, key in named if key in parts)
    return f"cold start {revision}: {cold['seconds']:.2f} s ({detail})"


class ScaleWatcher:
    """Prints each revision's cold starts and returns to zero, polling the platform's status."""

    def __init__(self, status: Callable[[], dict[str, Any]], interval_s: float = 0.5):
        self.status = status
        self.interval_s = interval_s
        self.seen: dict[str, float] = {}  # revision -> time of the last cold start printed
        self.running: set[str] = set()  # revisions with a process (ready, starting or stopping)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="scale-watcher", daemon=True)

    def poll(self) -> list[str]:
        """The lines for what changed since the last poll."""
        lines = []
        for service in self.status()["services"]:
            for rev in service["revisions"]:
                name = rev["revision"]
                cold = rev.get("last_cold_start")
                if cold and cold.get("at") != self.seen.get(name):
                    self.seen[name] = cold["at"]
                    self.running.add(name)  # even if it already went back to zero between two polls
                    lines.append(cold_start_line(name, cold))
                if rev.get("ready", 0) + rev.get("starting", 0) + rev.get("stopping", 0):
                    self.running.add(name)
                elif name in self.running:
                    self.running.discard(name)
                    idle = rev.get("idle_window_s")
                    lines.append(f"{name} scaled to zero" + (f" (idle {idle:g} s)" if idle is not None else ""))
        return lines

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                lines = self.poll()
            except Exception as exc:  # a missed poll must not end the watcher
                lines = [f"(platform status unavailable: {exc!r})"]
            for line in lines:
                print(line, flush=True)

    def start(self) -> ScaleWatcher:
        self.poll()  # what is already there is not news
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def print_urls(platform: Any, urls: dict[str, str]) -> None:
    """Service URLs (and tag URLs) of the platform's functions, then the functions given as URLs."""
    served = set()
    if platform is not None:
        print(f"platform gateway: {platform.gateway_url}  (Host routing; /metrics /status /healthz)")
        for service in platform.status()["services"]:
            served.add(service["name"])
            split = ", ".join(f"{t['revision']} {t['percent']}%" for t in service["traffic"] if t["percent"])
            procs = sum(r.get("ready", 0) + r.get("starting", 0) for r in service["revisions"])
            scale = f"{procs} process{'es' if procs > 1 else ''} (min-scale)" if procs else "at zero"
            print(f"function {service['name']:<12} {service['url']}  ({scale}; {split})")
            for target in service["traffic"]:
                if target["tag"]:
                    label = f"{target['tag']}-{service['name']}"
                    print(f"  tag {label:<20} {target['url']} -> {target['revision']}")
        print(f"process logs in {platform.log_dir}")
    for name, url in sorted(urls.items()):
        if name not in served:
            print(f"function {name:<12} {url}  (given)")


class ResultPrinter:
    """Prints every event arriving on the given topics (from their current end)."""

    def __init__(self, kafka: Any, topics: list[str]):
        import threading

        from confluent_kafka import OFFSET_END, Consumer, TopicPartition

        self.consumer = Consumer(kafka.consumer("onnxfn-up-printer"))
        meta = self.consumer.list_topics(timeout=10)
        self.consumer.assign([TopicPartition(t, p, OFFSET_END) for t in topics for p in meta.topics[t].partitions])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="result-printer", daemon=True)

    def _run(self) -> None:
        from shared.errors import FunctionError
        from shared.eventing.kafka_binding import from_record

        while not self.stopping.is_set():
            for message in self.consumer.consume(100, 0.2):
                if message.error() is not None:
                    continue
                try:
                    event = from_record(message.headers(), message.value())
                except FunctionError as exc:
                    print(f"  {message.topic()}: (not a CloudEvent: {exc.message})", flush=True)
                    continue
                about = event.get("requestid") or event.id
                print(f"  {message.topic():<26} {event.type:<30} {about[:12]:<12} {summary(event)}", flush=True)
        self.consumer.close()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


HEALTH_INTERVAL_S = 1.0


def worker_scalers(loaded: Any, kafka: Any, args: argparse.Namespace) -> list[Any]:
    """A started `WorkerScaler` per Trigger marked `onnxfn.dev/delivery: worker`."""
    from shared.contract import load_handler
    from shared.eventing.worker_scaler import WorkerScaler, idle_window_s

    out = []
    for trigger in loaded.triggers:
        if not trigger.worker:
            continue
        topic = loaded.brokers[f"{trigger.namespace}/{trigger.broker}"].topic
        config = load_handler(trigger.subscriber.ref.name).config
        idle = args.idle_window if args.idle_window is not None else idle_window_s(config)
        scaler = WorkerScaler(trigger, topic, kafka, args.eventing, args.knative, idle, say=_say)
        out.append(scaler.start())
        print(f"worker {scaler.function}: Trigger/{trigger.name} runs as `onnxfn worker` (started on lag, "
              f"stopped after {idle:g} s without)")  # fmt: skip
    return out


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")  # one write: the scalers' threads print at the same time
    sys.stdout.flush()


def start_console(plane: Any, kafka: Any, platform: Any, traces: Path | None, port: int) -> Any:
    """The live console on `port`, its state gathered from the plane, the platform and the traces."""
    from shared.eventing.console import ConsoleServer, ConsoleState
    from shared.eventing.sink import TopicTarget

    assert plane.writer is not None
    topic = next(iter(plane.spec.brokers.values())).topic
    status = platform.status if platform is not None else None
    state = ConsoleState(plane, kafka, status, traces, TopicTarget(plane.writer, topic)).start()
    server = ConsoleServer(state, port=port).start()
    return _Console(state, server)


class _Console:
    def __init__(self, state: Any, server: Any) -> None:
        self.state, self.server = state, server
        self.url = server.url

    def stop(self) -> None:
        self.server.stop()
        self.state.stop()


def process_health(broker: Any, platform: Any) -> list[Health]:
    """The embedded broker and the platform process: ready while they run, failed once exited."""
    found = []
    for name, child in (("embedded broker", broker), ("platform process", platform)):
        if child is None:
            continue
        code = child.exit_code
        found.append(Health(name, READY) if code is None else Health(name, FAILED, f"exited with code {code}"))
    return found


def run(args: argparse.Namespace) -> int:
    import logging

    from confluent_kafka import KafkaException

    from shared.eventing import spec
    from shared.eventing.cliutil import connect, parse_extensions
    from shared.eventing.plane import EventPlane, PlaneOptions
    from shared.eventing.sink import KafkaWriter, TopicTarget
    from shared.platform.child import PlatformProcess, scaling_flags

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loaded = spec.load(args.eventing, args.knative)
    except spec.SpecError as exc:
        print(f"up: {exc}", file=sys.stderr)
        return 2
    stop = StopSignal().install()
    traces = set_up_tracing(args)

    broker = None
    plane_state = plane_state_file(args.state_file)
    exit_code = 0
    platform: PlatformProcess | None = None
    scalers: list[Any] = []
    watcher = None
    plane = None
    printer = None
    console = None
    try:
        kafka, broker = connect(args.bootstrap_servers)
        urls = parse_extensions(args.function_url)
        wanted = [] if args.no_functions else [name for name in loaded.functions() if name not in urls]
        if wanted:
            platform = PlatformProcess(
                wanted,
                knative_dir=args.knative,
                state_file=args.state_file,
                gateway_port=args.gateway_port,
                scaling_flags=scaling_flags(args.idle_window, args.stable_window, args.max_processes),
                log=Path(tempfile.gettempdir()) / f"onnxfn-up-platform-{os.getpid()}.log",
            )
            platform.start()
            urls.update({name: platform.url_for(name) for name in wanted})
        plane = EventPlane(loaded, kafka, urls, PlaneOptions(ingress_port=args.ingress_port))
        plane.health_sources.append(lambda: process_health(broker, platform))
        plane.start()
        scalers = worker_scalers(loaded, kafka, args)
        plane.health_sources.append(lambda: [s.health() for s in scalers])
        state = {"pid": os.getpid(), "ingress": plane.ingress_url, "traces": str(traces) if traces else None}
        plane_state.write_text(json.dumps(state))
        print(f"Kafka bootstrap servers: {kafka.bootstrap_servers}" + (" (embedded Tansu)" if broker else ""))
        for b in loaded.brokers.values():
            print(f"broker ingress:  {plane.ingress_url}{b.path}  (topic {b.topic})")
        print_urls(platform, urls)
        if not args.no_console:
            console = start_console(plane, kafka, platform, traces, args.console_port)
            print(f"console:         {console.url}  (functions, triggers, dead letters, traces; live)")
        inputs = [t for s in loaded.sources for t in s.topics]
        sinks = sorted(s.topic for s in loaded.sinks.values())
        print(f"input topics:    {', '.join(inputs)}")
        print(f"result topics:   {', '.join(sinks)}")
        if platform is not None:
            watcher = ScaleWatcher(platform.status).start()
        if not args.quiet:
            printer = ResultPrinter(kafka, sinks)
            printer.start()
        print("READY", flush=True)
        if args.samples and inputs:
            events = sample_events(entry_functions(loaded), args.samples)
            writer = KafkaWriter(kafka)
            target = TopicTarget(writer, inputs[0])
            for event in events:
                target.send(event, lambda err: None if err is None else print(f"publish failed: {err}"))
            writer.close()
            print(f"published {len(events)} sample events to {inputs[0]}; results follow (Ctrl-C to stop)", flush=True)
        while not stop.wait(HEALTH_INTERVAL_S):
            problems = plane.recover()
            if problems:
                print(f"up: {'; '.join(problems)}: stopping everything", file=sys.stderr, flush=True)
                exit_code = 1
                break
        print("shutting down ...", flush=True)
    except (RuntimeError, ValueError, OSError, KafkaException) as exc:
        hint = ""
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            hint = f" (broker ingress port {args.ingress_port} is taken: pass --ingress-port 0 for any free port)"
        print(f"up: {exc}{hint}", file=sys.stderr)
        return 1
    finally:
        plane_state.unlink(missing_ok=True)
        if printer is not None:
            printer.stop()
        if console is not None:
            console.stop()
        if watcher is not None:
            watcher.stop()
        for scaler in scalers:
            scaler.stop()  # each worker drains and commits while the broker still runs
        if plane is not None:
            plane.stop()  # its librdkafka clients are closed before the broker stops
        if platform is not None:
            platform.stop()
        if broker is not None:
            broker.stop()
        from shared import tracing

        tracing.shutdown()
    return exit_code

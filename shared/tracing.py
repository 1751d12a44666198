"""OpenTelemetry traces: one event is one trace across the ingress, Kafka, triggers, the activator,
the function and the sink, linked by the event's W3C `traceparent` (the CloudEvents
distributed-tracing extension, carried in `ce_traceparent` record headers and `ce-traceparent`
HTTP headers).

Each process calls `configure(service)` once; settings come from the standard OpenTelemetry
variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/HTTP export), `OTEL_TRACES_SAMPLER` /
`OTEL_TRACES_SAMPLER_ARG` (default: parent-based, 10% of new traces), `OTEL_SDK_DISABLED`, and
`ONNXFN_TRACE_DIR`, where `onnxfn up` keeps recent spans as JSON lines for `onnxfn traces`. With
neither an endpoint nor a directory, tracing is off and every call here returns at once.

Hops record spans from times they measure anyway (`start_s`/`end_s`, seconds since the epoch), and
hand the span's `traceparent` on with the event, so the next hop's span is its child. A span whose
trace is not sampled costs one non-recording span and is never exported.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.1
TRACE_DIR_ENV = "ONNXFN_TRACE_DIR"
MAX_FILE_BYTES = 4 * 1024 * 1024  # a process's span file is rotated (one old file kept) beyond this
SAMPLERS = {  # OTEL_TRACES_SAMPLER -> (follows a parent's decision, ratio of the rest; None: the argument)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}
_PERF_TO_EPOCH_S = time.time() - time.perf_counter()
_LOW_64 = (1 << 64) - 1
_KINDS = ("internal", "server", "client", "producer", "consumer")  # SpanKind's values, in order


@dataclass(frozen=True)
class TraceSettings:
    """Where spans go and which traces are kept, read once from the environment."""

    otlp_endpoint: str | None
    trace_dir: Path | None
    parent_based: bool
    ratio: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TraceSettings:
        disabled = env.get("OTEL_SDK_DISABLED", "").lower() == "true"
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        directory = env.get(TRACE_DIR_ENV)
        name = env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").lower()
        if name not in SAMPLERS:
            raise ValueError(f"OTEL_TRACES_SAMPLER {name!r} is not one of {', '.join(SAMPLERS)}")
        parent_based, fixed = SAMPLERS[name]
        try:
            ratio = fixed if fixed is not None else float(env.get("OTEL_TRACES_SAMPLER_ARG", DEFAULT_RATIO))
        except ValueError:
            arg = env["OTEL_TRACES_SAMPLER_ARG"]
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number, not {arg!r}") from None
        return cls(
            otlp_endpoint=None if disabled else endpoint or None,
            trace_dir=None if disabled or not directory else Path(directory),
            parent_based=parent_based,
            ratio=min(1.0, max(0.0, ratio)),
        )

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None or self.trace_dir is not None


@dataclass(frozen=True)
class _Tracer:
    """This process's exporters and sampling, set once by `configure`."""

    settings: TraceSettings
    processors: tuple[Any, ...]
    resource: Any
    scope: Any
    bound: int  # a new trace is sampled when its id's low 64 bits are below this (TraceIdRatioBased's rule)
    sdk: Any  # the SDK classes a finished span is built from, imported once


_tracer: _Tracer | None = None
_lock = threading.Lock()


def configure(service: str, settings: TraceSettings | None = None) -> bool:
    """Set up this process's tracing once (later calls keep the first); whether it is on."""
    global _tracer
    settings = settings or TraceSettings.from_env()
    with _lock:
        if _tracer is not None or not settings.enabled:
            return _tracer is not None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        processors = []
        if settings.trace_dir is not None:
            processors.append(BatchSpanProcessor(span_file_exporter(settings.trace_dir, service)))
        if settings.otlp_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_OTLP_*
        resource = Resource.create({"service.name": service})
        bound = round(settings.ratio * (_LOW_64 + 1))
        scope = InstrumentationScope("onnxfn")
        _tracer = _Tracer(settings, tuple(processors), resource, scope, bound, _sdk_classes())
        log.info("tracing on for %s (%s)", service, settings)
        return True


def _sdk_classes() -> Any:
    from types import SimpleNamespace

    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    return SimpleNamespace(
        ReadableSpan=ReadableSpan,
        SpanContext=SpanContext,
        Status=Status,
        StatusCode=StatusCode,
        sampled=TraceFlags(TraceFlags.SAMPLED),
        unset=Status(StatusCode.UNSET),
        kinds={name: SpanKind(index) for index, name in enumerate(_KINDS)},
    )


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Export what is buffered (at the end of a process)."""
    if _tracer is not None:
        for processor in _tracer.processors:
            processor.shutdown()


def epoch_s(perf_counter_s: float) -> float:
    """A `time.perf_counter()` reading as seconds since the epoch (for span times)."""
    return perf_counter_s + _PERF_TO_EPOCH_S


class Span:
    """One hop's span, recorded when it ends; `traceparent` is what the hop hands on. A span of a
    trace that is not sampled records nothing and hands its parent's context on unchanged."""

    __slots__ = ("attributes", "error", "kind", "name", "parent_id", "sampled", "span_id", "start_ns", "trace_id")

    def __init__(
        self, name: str, trace_id: int, parent_id: int | None, sampled: bool, start_ns: int, kind: str
    ) -> None:
        self.name, self.trace_id, self.parent_id, self.sampled = name, trace_id, parent_id, sampled
        self.span_id = random.getrandbits(64) or 1
        self.start_ns, self.kind = start_ns, kind
        self.attributes: dict[str, Any] = {}
        self.error = ""

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


class PassedOn:
    """The span of a hop whose trace is not kept: nothing recorded; the parent's context is handed
    on unchanged (None: a new trace not kept by a hop that hands nothing on)."""

    __slots__ = ("traceparent",)
    sampled = False

    def __init__(self, traceparent: str | None) -> None:
        self.traceparent = traceparent


NOT_KEPT = PassedOn(None)


def _parent_ids(traceparent: str) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of a W3C traceparent, read by OpenTelemetry's propagator; None
    when it is malformed (the hop then starts a new trace, as the W3C spec says)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = trace.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
    span_context = ctx.get_span_context()
    if not span_context.is_valid:
        return None
    return span_context.trace_id, span_context.span_id, span_context.trace_flags.sampled


def start(
    name: str,
    parent: str | Span | None,
    start_s: float | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    mark_unkept: bool = True,
) -> Span | PassedOn | None:
    """A span begun at `start_s`, child of `parent`: this process's span, or a remote one's
    traceparent (a new trace when None or malformed); None when tracing is off. Hand
    `span.traceparent` on with the event; `end` it. A new trace that is not kept gets an
    unsampled traceparent for the next hops, unless `mark_unkept` is False (a hop that answers
    its caller directly): then NOT_KEPT, at no cost."""
    tracer = _tracer
    if tracer is None:
        return None
    if isinstance(parent, Span):
        child = Span(name, parent.trace_id, parent.span_id, parent.sampled, _start_ns(start_s), kind)
        if parent.sampled and attributes:
            child.attributes.update(attributes)
        return child
    ids = None
    parent_id: int | None
    if parent:
        # W3C trace-flags are the last two hex digits: an unsampled parent is passed on without
        # parsing it (the hot path for the traces a parent-based sampler does not keep).
        if tracer.settings.parent_based and len(parent) == 55 and parent[-1] in "02468ace":
            return PassedOn(parent)
        ids = _parent_ids(parent)
    if ids is not None:
        trace_id, parent_id, sampled = ids
        if not tracer.settings.parent_based:  # a ratio sampler judges every trace id itself
            sampled = (trace_id & _LOW_64) < tracer.bound
    elif not mark_unkept:
        if random.random() >= tracer.settings.ratio:
            return NOT_KEPT
        trace_id, parent_id, sampled = random.getrandbits(128) or 1, None, True
    else:
        trace_id, parent_id = random.getrandbits(128) or 1, None
        sampled = (trace_id & _LOW_64) < tracer.bound
    span = Span(name, trace_id, parent_id, sampled, _start_ns(start_s), kind)
    if sampled and attributes:
        span.attributes.update(attributes)
    return span


def _start_ns(start_s: float | None) -> int:
    return int((start_s if start_s is not None else time.time()) * 1e9)


def traceparent(span: Span | PassedOn | None) -> str | None:
    """What a hop hands on as the next hop's parent (None when tracing is off)."""
    return None if span is None else span.traceparent


def is_recording(span: Span | PassedOn | None) -> bool:
    return span is not None and span.sampled


def end(
    span: Span | PassedOn | None,
    end_s: float | None = None,
    attributes: Mapping[str, Any] | None = None,
    error: str = "",
) -> None:
    """Record `span` as ended at `end_s` (nothing for None or a trace not sampled)."""
    tracer = _tracer
    if tracer is None or not isinstance(span, Span) or not span.sampled:
        return
    sdk = tracer.sdk
    if attributes:
        span.attributes.update(attributes)
    flags = sdk.sampled
    parent = None if span.parent_id is None else sdk.SpanContext(span.trace_id, span.parent_id, True, flags)
    failed = error or span.error
    finished = sdk.ReadableSpan(
        name=span.name,
        context=sdk.SpanContext(span.trace_id, span.span_id, False, flags),
        parent=parent,
        resource=tracer.resource,
        attributes=span.attributes,
        kind=sdk.kinds[span.kind],
        status=sdk.Status(sdk.StatusCode.ERROR, failed) if failed else sdk.unset,
        start_time=span.start_ns,
        end_time=int((end_s if end_s is not None else time.time()) * 1e9),
        instrumentation_scope=tracer.scope,
    )
    for processor in tracer.processors:
        processor.on_end(finished)


def record(
    name: str,
    parent: str | Span | None,
    start_s: float,
    end_s: float,
    attributes: Mapping[str, Any] | None = None,
    kind: str = "internal",
    error: str = "",
) -> str | None:
    """A span that already happened; its traceparent (None when tracing is off)."""
    span = start(name, parent, start_s, kind, attributes)
    if span is None:
        return None
    end(span, end_s, error=error)
    return span.traceparent


# -- the embedded store: JSON lines per process, read back by `onnxfn traces` and the console ------
def span_file_exporter(directory: Path, service: str) -> Any:
    """An exporter appending finished spans as JSON lines to `<dir>/spans-<service>-<pid>.jsonl`
    (rotated beyond MAX_FILE_BYTES, one old file kept)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class SpanFileExporter(SpanExporter):
        def __init__(self) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"spans-{service}-{os.getpid()}.jsonl"

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            lines = b"".join(orjson.dumps(span_dict(s)) + b"\n" for s in spans)
            try:
                if self.path.exists() and self.path.stat().st_size > MAX_FILE_BYTES:
                    self.path.replace(self.path.with_suffix(".jsonl.1"))
                with self.path.open("ab") as out:
                    out.write(lines)
            except OSError as exc:
                log.warning("could not write spans to %s: %s", self.path, exc)
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    return SpanFileExporter()


def span_dict(span: Any) -> dict[str, Any]:
    """One finished SDK span as the store keeps it."""
    parent = span.parent
    return {
        "trace_id": f"{span.context.trace_id:032x}",
        "span_id": f"{span.context.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "name": span.name,
        "kind": span.kind.name.lower(),
        "service": span.resource.attributes.get("service.name", ""),
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time_ns": e.timestamp, **dict(e.attributes or {})} for e in span.events],
        "error": span.status.description or "" if span.status.status_code.name == "ERROR" else "",
    }


def read_spans(directory: Path) -> list[dict[str, Any]]:
    """Every span kept under `directory` (unreadable lines skipped: a file may be mid-write)."""
    spans = []
    for path in sorted(directory.glob("spans-*.jsonl*")):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for line in data.splitlines():
            try:
                spans.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
    return spans


def traces(spans: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """trace id -> its spans in start order, most recent trace first."""
    found: dict[str, list[dict[str, Any]]] = {}
    for span in spans:
        found.setdefault(span["trace_id"], []).append(span)
    ordered = sorted(found.items(), key=lambda item: -max(s["end_ns"] for s in item[1]))
    return {trace_id: sorted(group, key=lambda s: s["start_ns"]) for trace_id, group in ordered}


def waterfall(spans: list[dict[str, Any]], width: int = 40) -> str:
    """One trace as text: each span indented under its parent, with a bar on the trace's time line."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for span in spans:
        by_parent.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(span)
    t0 = min(s["start_ns"] for s in spans)
    total = max(max(s["end_ns"] for s in spans) - t0, 1)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in by_parent.get(parent, []):
            first = int((span["start_ns"] - t0) / total * width)
            length = max(1, int((span["end_ns"] - span["start_ns"]) / total * width))
            bar = " " * first + "#" * min(length, width - first)
            ms = (span["end_ns"] - span["start_ns"]) / 1e6
            label = f"{'  ' * depth}{span['name']} [{span['service']}]"
            error = f"  ERROR {span['error']}" if span["error"] else ""
            lines.append(f"{label:<56} {bar:<{width}} {ms:9.2f} ms{error}")
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return "\n".join(lines)

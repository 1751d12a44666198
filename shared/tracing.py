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
_PERF_TO_EPOCH_S = time.time() - time.perf_counter()

_tracer: Any = None
_provider: Any = None
_lock = threading.Lock()


@dataclass(frozen=True)
class TraceSettings:
    """Where spans go and which traces are kept, read once from the environment."""

    otlp_endpoint: str | None
    trace_dir: Path | None
    sampler: str | None  # OTEL_TRACES_SAMPLER when set (then the SDK reads it and its argument)
    ratio: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TraceSettings:
        disabled = env.get("OTEL_SDK_DISABLED", "").lower() == "true"
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        directory = env.get(TRACE_DIR_ENV)
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", DEFAULT_RATIO))
        except ValueError:
            arg = env["OTEL_TRACES_SAMPLER_ARG"]
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a number, not {arg!r}") from None
        return cls(
            otlp_endpoint=None if disabled else endpoint or None,
            trace_dir=None if disabled or not directory else Path(directory),
            sampler=env.get("OTEL_TRACES_SAMPLER") or None,
            ratio=min(1.0, max(0.0, ratio)),
        )

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None or self.trace_dir is not None


def configure(service: str, settings: TraceSettings | None = None) -> bool:
    """Set up this process's tracer once (later calls keep the first); whether tracing is on."""
    global _tracer, _provider
    settings = settings or TraceSettings.from_env()
    with _lock:
        if _tracer is not None or not settings.enabled:
            return _tracer is not None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = None if settings.sampler else ParentBased(TraceIdRatioBased(settings.ratio))
        provider = TracerProvider(sampler=sampler, resource=Resource.create({"service.name": service}))
        if settings.trace_dir is not None:
            provider.add_span_processor(BatchSpanProcessor(span_file_exporter(settings.trace_dir, service)))
        if settings.otlp_endpoint is not None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_OTLP_*
        _provider, _tracer = provider, provider.get_tracer("onnxfn")
        log.info("tracing on for %s (%s)", service, settings)
        return True


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Export what is buffered (at the end of a process)."""
    if _provider is not None:
        _provider.shutdown()


def epoch_s(perf_counter_s: float) -> float:
    """A `time.perf_counter()` reading as seconds since the epoch (for span times)."""
    return perf_counter_s + _PERF_TO_EPOCH_S


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _context(traceparent: str | None) -> Any:
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent(span: Any) -> str:
    """The W3C `traceparent` naming `span` as the parent (sampled flag included)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def is_recording(span: Any) -> bool:
    return span is not None and bool(span.is_recording())


def start(
    name: str,
    parent: str | None,
    start_s: float | None = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
) -> Any:
    """A started span, child of the `parent` traceparent (a new trace when None); None when tracing
    is off. Its `traceparent(span)` goes on with the event; end it with `end(span, ...)`."""
    if _tracer is None:
        return None
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        name,
        context=_context(parent),
        kind=getattr(SpanKind, kind.upper()),
        attributes=dict(attributes) if attributes else None,
        start_time=_ns(start_s if start_s is not None else time.time()),
    )


def end(span: Any, end_s: float | None = None, attributes: Mapping[str, Any] | None = None, error: str = "") -> None:
    """End `span` (a no-op for None or a span of a trace not sampled)."""
    if not is_recording(span):
        return
    if attributes:
        span.set_attributes(dict(attributes))
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=_ns(end_s if end_s is not None else time.time()))


def record(
    name: str,
    parent: str | None,
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
    return traceparent(span)


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

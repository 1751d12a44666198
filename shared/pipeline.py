"""The transport-agnostic pipeline every entry point calls: event -> result event.

type check -> handler.preprocess -> dynamic batcher -> model run -> handler.postprocess -> result event.
It owns the model's life cycle (load and warm-up in the background; `ready` only after both) and
times each stage into Metrics. HTTP, Kafka and benchmarks all go through `Pipeline.process`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared import tracing
from shared.batcher import DynamicBatcher, Feeds, RunTiming
from shared.config import Settings, available_cores
from shared.contract import FunctionConfig, Handler, Result, bind_model, setup_handler
from shared.engine import EngineClient
from shared.errors import (
    FunctionError,
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    UnknownEventType,
)
from shared.events import ERROR_EVENT_TYPE, Event, result_event, with_traceparent
from shared.metrics import Metrics
from shared.model import ModelInfo, OnnxModel
from shared.readiness import WorkerReadiness

log = logging.getLogger(__name__)

# A model whose one-row run takes less than this runs inline on the event loop: a hand-off to the
# inference thread and back (~0.05-0.1 ms of CPU) would cost more than the run.
INLINE_RUN_S = 0.0002
# Warm-up beyond the first run is skipped when it would take longer than this.
WARM_UP_BUDGET_S = 0.02


@dataclass(frozen=True)
class Layout:
    """How a server uses the machine: worker processes, concurrent model runs and onnxruntime threads.

    Each session (a worker's, or the engine's) runs one batch at a time unless
    `ONNXFN_INFERENCE_THREADS` asks for more, on cores / workers onnxruntime threads (all cores
    in the engine), shared among its runs.
    """

    workers: int
    inference_threads: int
    intra_op_threads: int
    spinning: bool
    max_batch_size: int
    queue_capacity: int
    engine: bool  # one shared engine process owns the session (else one session per worker)

    @classmethod
    def of(cls, config: FunctionConfig, settings: Settings) -> Layout:
        engine = uses_engine(config, settings)
        workers = settings.workers or config.workers
        cores = available_cores() if engine else max(1, available_cores() // workers)
        runs = settings.inference_threads or 1
        return cls(
            engine=engine,
            workers=workers,
            inference_threads=runs,
            intra_op_threads=settings.intra_op_threads or max(1, cores // runs),
            # Spinning threads steal the cores the event loop needs between runs: off unless asked.
            spinning=bool(settings.intra_op_spinning),
            max_batch_size=settings.max_batch_size or config.batching.max_batch_size,
            queue_capacity=settings.queue_capacity or config.batching.queue_capacity,
        )


def _engine_failure(socket_path: Any) -> str | None:
    """Why the engine could not load its model, when it said so (else it is still starting)."""
    from shared.engine import failure_file

    try:
        return failure_file(socket_path).read_text() or None
    except OSError:
        return None


def uses_engine(config: FunctionConfig, settings: Settings) -> bool:
    """Whether the session lives in a shared engine process: the setting, else the function's
    choice, else on a GPU (one CUDA context, batches across workers) but not on CPU (measured:
    a session per worker saves the hand-off to the engine, which costs more than it gains there)."""
    if config.model_file is None:
        return False
    choice = settings.engine if settings.engine != "auto" else config.engine
    if choice != "auto":
        return choice == "shared"
    return uses_gpu(settings)


def uses_gpu(settings: Settings) -> bool:
    """Whether the session will ask for a GPU (it still falls back to the CPU if none works)."""
    from shared.model import gpu_visible

    return settings.providers in ("cuda", "tensorrt") or (settings.providers == "auto" and gpu_visible())


class Pipeline:
    """One function's processing path inside one process."""

    def __init__(self, handler: Handler, settings: Settings, metrics: Metrics) -> None:
        self.handler = handler
        self.config = handler.config
        self.settings = settings
        self.metrics = metrics
        self.layout = Layout.of(self.config, settings)
        self.source = f"/functions/{self.config.name}"
        self.model_version = settings.model_version or self.config.model_version
        self.model_file = self.config.model_file_for(self.model_version)
        self.revision = settings.k_revision or f"{self.config.name}-v{self.model_version}"
        self.model: ModelInfo | None = None
        self.batcher: DynamicBatcher | EngineClient | None = None
        self.load_error: str | None = None
        self.timings: dict[str, float] = {}
        # When the server process started (set by whoever knows it: serve, the Kafka worker); the
        # startup histogram observes start -> ready.
        self.server_started_at: float | None = None
        self._ready = threading.Event()
        self.workers = WorkerReadiness(settings.state_dir, self.layout.workers)

    # -- life cycle ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self, background: bool = True) -> None:
        """Load the model and warm up, then mark ready (in a thread unless `background` is False)."""
        self.timings["started_at"] = time.time()
        if self.layout.engine:
            self._engine_task = asyncio.get_running_loop().create_task(self._link_engine())
        elif background:
            threading.Thread(target=self._load, name="onnxfn-load", daemon=True).start()
        else:
            self._load()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def _load(self) -> None:
        """Load and warm up; on failure, say why in readiness and try again (a model volume may come late)."""
        delay = 0.5
        while not self._try_load():
            time.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _link_engine(self) -> None:
        """Connect to the engine process (retrying until it listens), warm up through it, then be
        ready; when the engine goes away, leave readiness until it is back."""
        assert self.settings.engine_socket is not None, "the shared engine needs ONNXFN_ENGINE_SOCKET"
        delay, set_up = 0.01, False
        while True:
            try:
                client = await EngineClient.connect(self.settings.engine_socket)
            except (OSError, asyncio.IncompleteReadError):
                self.load_error = _engine_failure(self.settings.engine_socket) or self.load_error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            delay = 0.01
            try:
                started = time.perf_counter()
                if not set_up:
                    setup_handler(self.handler, self.settings.model_dir)
                    set_up = True
                bind_model(self.handler, client)
                example = self.handler.example()
                outputs = await client.submit(self.handler.preprocess(example))
                self.handler.postprocess({k: v[0] for k, v in outputs.items()}, example)
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.error("function %s could not warm up through the engine: %s", self.config.name, self.load_error)
                client.close()
                await asyncio.sleep(1.0)
                continue
            self.model, self.batcher, self.load_error = client, client, None
            hello = client.hello
            self.timings.update(
                model_load_s=hello["model_load_s"],
                warmup_s=hello["warmup_s"] + time.perf_counter() - started,
                engine_pid=hello["pid"],
                ready_at=time.time(),
            )
            if self.server_started_at is not None:
                self.metrics.startup.observe(time.time() - self.server_started_at)
            self._ready.set()
            self.workers.mark_ready()
            log.info("function %s ready on the engine (pid %d, %s)", self.config.name, hello["pid"], client.providers)
            await asyncio.shield(client.closed)
            self._ready.clear()
            self.workers.mark_not_ready()
            self.load_error = "the inference engine stopped; it is being restarted"

    def _try_load(self) -> bool:
        try:
            t0 = time.perf_counter()
            setup_handler(self.handler, self.settings.model_dir)
            model: OnnxModel | None = None
            if self.model_file is not None:
                model = OnnxModel(
                    self.settings.model_dir / self.model_file,
                    providers=self.settings.providers,
                    intra_op_threads=self.layout.intra_op_threads,
                    spinning=self.layout.spinning,
                    cache_dir=self.settings.cache_dir,
                )
                bind_model(self.handler, model)
            t1 = time.perf_counter()
            run_s = self._warm_up(model)
            if model is not None:
                self.model = model
                self.batcher = DynamicBatcher(
                    model.run,
                    max_batch_size=self.layout.max_batch_size,
                    capacity=self.layout.queue_capacity,
                    inline=not model.on_gpu and run_s < INLINE_RUN_S,
                    threads=self.layout.inference_threads,
                    observe=self.metrics.observe_batch,
                )
            t2 = time.perf_counter()
        except Exception as exc:
            if self.load_error is None:
                log.error("function %s failed to load (will retry): %s: %s", self.config.name, type(exc).__name__, exc)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return False
        self.load_error = None
        self.timings.update(model_load_s=t1 - t0, warmup_s=t2 - t1, run_ms=run_s * 1000, ready_at=time.time())
        self.metrics.model_load.observe(t1 - t0)
        self.metrics.warmup.observe(t2 - t1)
        if self.server_started_at is not None:
            self.metrics.startup.observe(time.time() - self.server_started_at)
        self._ready.set()
        self.workers.mark_ready()
        log.info(
            "function %s ready: load %.3f s, warm-up %.3f s, one row %.3f ms (%s), providers %s",
            self.config.name,
            t1 - t0,
            t2 - t1,
            run_s * 1000,
            "inline" if self.batcher is not None and self.batcher.inline else "inference thread",
            self.model.providers if self.model else "none",
        )
        return True

    def _warm_up(self, model: OnnxModel | None) -> float:
        """Run the example through preprocess, model and postprocess; returns one row's run time (s).

        The largest batch is run too only when that is cheap (it saves the first loaded batch its
        allocations); for a slow model it would cost more start time than it saves.
        """
        example = self.handler.example()
        feeds = self.handler.preprocess(example)
        if model is None:
            self.handler.postprocess({k: v[0] for k, v in feeds.items()}, example)
            return 0.0
        outputs = model.run(feeds)
        self.handler.postprocess({k: v[0] for k, v in outputs.items()}, example)
        started = time.perf_counter()
        model.run(feeds)  # the second run shows the steady cost (the first one allocates)
        run_s = time.perf_counter() - started
        rows = self.layout.max_batch_size
        if run_s * rows <= WARM_UP_BUDGET_S:
            model.run({k: np.repeat(v, rows, axis=0) for k, v in feeds.items()})
        return run_s

    async def _await_ready(self) -> None:
        """Hold a request that arrives while the model is still loading (bounded); 503 after that,
        or at once when loading failed."""
        deadline = time.monotonic() + self.settings.ready_wait_s
        while self.load_error is None and not self._ready.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        if not self._ready.is_set():
            raise self.not_ready_error()

    @property
    def server_ready(self) -> bool:
        """This worker and every other worker of the server have their model."""
        return self._ready.is_set() and self.workers.all_ready()

    def not_ready_error(self) -> ModelNotReady:
        if self.load_error:
            return ModelNotReady(f"model failed to load: {self.load_error}")
        if self._ready.is_set():
            return ModelNotReady(f"{self.workers.count()} of {self.workers.expected} workers ready; retry shortly")
        return ModelNotReady("model is loading; retry shortly")

    # -- requests -----------------------------------------------------------------------------------
    @contextmanager
    def request(self) -> Iterator[None]:
        """Bracket one HTTP request (the in-flight gauge)."""
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()

    def _preprocess(self, event: Event) -> Feeds:
        if event.type not in self.config.accepts:
            raise UnknownEventType(
                f"event type {event.type!r} is not accepted by {self.config.name} "
                f"(accepts: {', '.join(self.config.accepts)})",
                event_id=event.id,
            )
        try:
            return self.handler.preprocess(event.data)
        except InvalidInput as exc:
            exc.event_id = event.id
            raise
        except Exception as exc:
            raise InvalidInput([f"could not read event data: {type(exc).__name__}: {exc}"], event.id) from None

    def _finish(self, event: Event, outputs: Feeds) -> Event:
        row = {name: value[0] for name, value in outputs.items()}
        try:
            out = self.handler.postprocess(row, event.data)
        except Exception as exc:
            log.exception("postprocess failed for event %s", event.id)
            raise InferenceFailed(f"postprocess failed: {type(exc).__name__}: {exc}", event_id=event.id) from None
        type_ = self.config.result_type
        if isinstance(out, Result):
            type_ = out.type or type_
            out = out.data
        return result_event(event, type_, self.source, out, self.model_version, self.revision)

    async def process(self, event: Event) -> Event:
        """One request event -> its result event. Raises FunctionError."""
        if not self._ready.is_set():
            await self._await_ready()
        span = self._span(event) if tracing.enabled() else None
        if isinstance(span, tracing.Span) and span.sampled:
            return await self._process_traced(event, span)
        feeds = self._preprocess(event)
        if self.batcher is not None:
            feeds = await self.batcher.submit(feeds)
        result = self._finish(event, feeds)
        return result if span is None else with_traceparent(result, span.traceparent)

    def _span(self, event: Event) -> tracing.Span | tracing.PassedOn | None:
        """The function's span for one event, begun now (the sampling decision is made here, so a
        trace that is not kept costs the event nothing more)."""
        # An event with no trace context is an HTTP call answered to its caller: a new trace that
        # is not kept hands nothing on (the result's hops decide for themselves).
        span = tracing.start(f"function {self.config.name}", event.get("traceparent"), kind="server", mark_unkept=False)
        if isinstance(span, tracing.Span) and span.sampled:
            span.attributes.update(
                {
                    "onnxfn.function": self.config.name,
                    "onnxfn.revision": self.revision,
                    "cloudevents.event_id": event.id,
                }
            )
        return span

    async def _process_traced(self, event: Event, span: tracing.Span) -> Event:
        began = time.perf_counter()
        try:
            feeds = self._preprocess(event)
        except FunctionError as exc:
            done = time.perf_counter()
            self._trace(span, None, (began, done, None, done, done), exc)
            raise
        prepared, timing = time.perf_counter(), RunTiming()
        if self.batcher is not None:
            feeds = await self._submit(feeds, timing)
        resumed = time.perf_counter()
        result = self._finish(event, feeds)
        self._trace(span, result, (began, prepared, timing, resumed, time.perf_counter()))
        return with_traceparent(result, span.traceparent)

    def _submit(self, feeds: Feeds, timing: RunTiming, admitted: bool = False) -> asyncio.Future[Feeds]:
        assert self.batcher is not None
        if isinstance(self.batcher, DynamicBatcher):
            return self.batcher.submit(feeds, admitted=admitted, timing=timing)
        return self.batcher.submit(feeds, admitted=admitted)  # the engine: its run is one "inference" span

    @staticmethod
    def _trace(
        span: tracing.Span,
        result: Event | None,
        times: tuple[float, float, RunTiming | None, float, float],
        error: FunctionError | None = None,
    ) -> None:
        """End the function's span for one event with its stages as children (perf_counter times):
        preprocess, queue, inference (with the run's rows) and postprocess."""
        began, prepared, timing, resumed, done = times
        epoch = tracing.epoch_s
        tracing.record("preprocess", span, epoch(began), epoch(prepared))
        if timing is not None and timing.started:
            tracing.record("queue", span, epoch(timing.enqueued), epoch(timing.started))
            rows = {"onnxfn.batch.rows": timing.rows}
            tracing.record("inference", span, epoch(timing.started), epoch(timing.finished), rows)
        elif timing is not None and resumed > prepared:
            tracing.record("inference", span, epoch(prepared), epoch(resumed), {"onnxfn.engine": True})
        if result is not None:
            tracing.record("postprocess", span, epoch(resumed), epoch(done))
        failed = error.message if error is not None else ""
        if result is not None and result.type == ERROR_EVENT_TYPE:
            failed = str((result.data or {}).get("error", "error event"))
        tracing.end(span, epoch(done), error=failed)

    async def process_batch(self, events: list[Event]) -> list[Event]:
        """Many events in one request, all through the batcher together.

        An event that is invalid (a 4xx) becomes an error event in its place, so the others are not
        lost; a retryable failure (429, 5xx) fails the whole request so the sender retries it. The
        events' inputs go to the batcher as few items (one per input shape, at most
        `max_batch_size` rows each), not one item an event; the request is let in when the queue
        has room for its first item (so one larger than the queue still runs).
        """
        if not self._ready.is_set():
            await self._await_ready()
        spans = [self._span(event) for event in events] if tracing.enabled() else None
        timed = spans is not None and any(s.sampled for s in spans if s is not None)
        began: list[float] = []
        prepared: list[Feeds | FunctionError] = []
        for event in events:
            if timed:
                began.append(time.perf_counter())
            try:
                prepared.append(self._preprocess(event))
            except FunctionError as exc:
                prepared.append(exc)
        ready = time.perf_counter() if timed else 0.0
        outputs: dict[int, Feeds] = {}
        timings: dict[int, RunTiming] = {}
        if self.batcher is not None:
            await self._run_together(prepared, outputs, timings if timed else None)
        resumed = time.perf_counter() if timed else 0.0
        results: list[Event] = []
        for index, (event, item) in enumerate(zip(events, prepared, strict=True)):
            if isinstance(item, FunctionError):
                result = self.error_event(event, item)
            else:
                result = self._finish(event, outputs.get(index, item))
            span = spans[index] if spans is not None else None
            if isinstance(span, tracing.Span) and span.sampled:
                prepared_at = began[index + 1] if index + 1 < len(began) else ready
                self._trace(span, result, (began[index], prepared_at, timings.get(index), resumed, time.perf_counter()))
            results.append(with_traceparent(result, tracing.traceparent(span)))
        return results

    async def _run_together(
        self,
        prepared: list[Feeds | FunctionError],
        outputs: dict[int, Feeds],
        timings: dict[int, RunTiming] | None = None,
    ) -> None:
        """Run every prepared input through the batcher in as few items as their shapes allow;
        fills `outputs` by event index (and `timings`, when given, with each event's run)."""
        assert self.batcher is not None
        valid = {index: item for index, item in enumerate(prepared) if not isinstance(item, FunctionError)}
        by_shape: dict[tuple[Any, ...], list[int]] = {}
        for index, feeds in valid.items():
            signature = tuple((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items())
            by_shape.setdefault(signature, []).append(index)
        submitted: list[tuple[list[int], Any]] = []
        limit = self.layout.max_batch_size
        for indices in by_shape.values():
            for start in range(0, len(indices), limit):
                chunk = indices[start : start + limit]
                feeds = {name: np.concatenate([valid[i][name] for i in chunk]) for name in valid[chunk[0]]}
                if timings is None:
                    submitted.append((chunk, self.batcher.submit(feeds, admitted=bool(submitted))))
                    continue
                timing = RunTiming()
                timings.update((i, timing) for i in chunk)
                submitted.append((chunk, self._submit(feeds, timing, admitted=bool(submitted))))
        failure: BaseException | None = None
        for chunk, future in submitted:
            try:
                rows = await future
            except FunctionError as exc:  # awaited to the end so no future is left unobserved
                failure = failure or exc
                continue
            offset = 0
            for index in chunk:
                count = len(next(iter(valid[index].values())))
                outputs[index] = {name: value[offset : offset + count] for name, value in rows.items()}
                offset += count
        if failure is not None:
            raise failure

    def error_event(self, event: Event, error: FunctionError) -> Event:
        """An error event answering `event`: the reason travels with the stream."""
        data = {"status": error.status, **error.to_json()}
        return result_event(event, ERROR_EVENT_TYPE, self.source, data, self.model_version, self.revision)

    async def infer_tensors(self, feeds: Feeds) -> Feeds:
        """Raw tensors in, raw tensors out (Open Inference Protocol); validated against the model."""
        if not self._ready.is_set():
            await self._await_ready()
        if self.model is None or self.batcher is None:
            raise InvalidInput([f"function {self.config.name} has no model to infer with"])
        problems = self.model.check_feeds(feeds)
        if problems:
            raise InvalidInput(problems)
        return await self.batcher.submit(feeds)

    def close(self) -> None:
        """Finish the run in progress and stop the inference thread (or the engine link)."""
        task = getattr(self, "_engine_task", None)
        if task is not None:
            task.cancel()
        if self.batcher is not None:
            self.batcher.close()

"""Benchmark of one function: raw onnxruntime, the function under `hey` (binary-mode CloudEvents at
each concurrency, and batched CloudEvents for digits), worker memory, cold start. The peers (naive
Flask, KServe, MLServer) are in `onnxfn bench --peers` (compare.py)."""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from shared.bench.hey import HeyResult, run_hey
from shared.bench.loadgen import run_load
from shared.config import Settings, available_cores
from shared.contract import load_handler, setup_handler
from shared.process import FunctionProcess, http_get, rss_mb

CONCURRENCIES = (1, 8, 32)
BATCHED_EVENTS = 64


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def raw_onnxruntime(name: str) -> dict[str, Any]:
    """In-process onnxruntime, all cores, thread spinning on and off (the best of both counts):
    batch-1 latency and the best rows/s over batch sizes."""
    import onnxruntime as ort

    settings = Settings.from_env({}, function=name)
    handler = load_handler(name)
    setup_handler(handler, settings.model_dir)
    assert handler.config.model_file is not None
    one = handler.preprocess(handler.example())
    latencies: list[float] = []
    by_batch: dict[str, float] = {}
    for spinning in ("1", "0"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = available_cores()
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        session = ort.InferenceSession(
            str(settings.model_dir / handler.config.model_file), options, providers=["CPUExecutionProvider"]
        )
        for _ in range(200):
            started = time.perf_counter()
            session.run(None, one)
            latencies.append(time.perf_counter() - started)
        for batch in (1, 4, 8, 16, 32, 64, 128):
            feeds = {k: np.repeat(v, batch, axis=0) for k, v in one.items()}
            session.run(None, feeds)
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < 0.5:
                session.run(None, feeds)
                runs += 1
            key = f"{batch}/spin{spinning}"
            by_batch[key] = runs * batch / (time.perf_counter() - started)
    best = max(by_batch, key=lambda b: by_batch[b])
    return {
        "batch1_p50_ms": float(min(np.percentile(latencies[:200], 50), np.percentile(latencies[200:], 50)) * 1000),
        "rows_per_s_by_batch": by_batch,
        "best_batch": best,
        "best_rows_per_s": by_batch[best],
    }


def _event_headers(name: str) -> dict[str, str]:
    config = load_handler(name).config
    return {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-source": "/bench",
        "ce-type": config.accepts[0],
        "Content-Type": "application/json",
    }


def _batch_body(name: str, data: Any, count: int) -> bytes:
    config = load_handler(name).config
    events = [
        {
            "specversion": "1.0",
            "id": f"b{i}",
            "source": "/bench",
            "type": config.accepts[0],
            "datacontenttype": "application/json",
            "data": data,
        }
        for i in range(count)
    ]
    return orjson.dumps(events)


def _batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the batch-size histogram across workers."""
    _, body = http_get(url + "/metrics")
    total = count = 0.0
    for line in body.decode().splitlines():
        if line.startswith("onnxfn_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("onnxfn_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def _phase(result: HeyResult, events_per_request: int = 1) -> dict[str, Any]:
    return {
        "req_per_s": result.req_per_s,
        "events_per_s": result.req_per_s * events_per_request,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "ok": result.ok,
        "statuses": result.statuses,
        "errors": result.errors,
    }


def cold_start(name: str, headers: dict[str, str], body: bytes, env: dict[str, str]) -> dict[str, Any]:
    """Launch `onnxfn serve` and POST until the first 200; split the time using the server's timings."""
    launched = time.time()
    server = FunctionProcess(name, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            result = run_load("127.0.0.1", server.port, "/", headers, body, concurrency=1, count=1, duration=2)
            if result.ok:
                break
            time.sleep(0.005)
        replied = time.time()
        server.wait_ready(timeout=30)  # the timings are in the readiness body once every worker is ready
        _, ready_body = http_get(server.url + "/health/readiness")
        timings = orjson.loads(ready_body)
        return {
            "first_reply_s": replied - launched,
            "imports_and_boot_s": timings.get("started_at", launched) - launched,
            "model_load_s": timings.get("model_load_s"),
            "warmup_s": timings.get("warmup_s"),
            # timings come from the worker that answered readiness; another may have replied first
            "ready_to_reply_s": max(0.0, replied - timings.get("ready_at", replied)),
        }
    finally:
        server.stop()


@dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures."""

    duration: float = 4.0
    concurrencies: tuple[int, ...] = CONCURRENCIES
    providers: str = "cpu"
    server_env: dict[str, str] = field(default_factory=dict)


def raw_accelerated(name: str, providers: str) -> dict[str, Any]:
    """In-process onnxruntime on an accelerator through OnnxModel (IOBinding), best rows/s over batch sizes."""
    from shared.model import OnnxModel

    settings = Settings.from_env({}, function=name)
    handler = load_handler(name)
    setup_handler(handler, settings.model_dir)
    assert handler.config.model_file is not None
    model = OnnxModel(settings.model_dir / handler.config.model_file, providers=providers)
    one = handler.preprocess(handler.example())
    for _ in range(20):
        model.run(one)
    latencies = []
    for _ in range(200):
        started = time.perf_counter()
        model.run(one)
        latencies.append(time.perf_counter() - started)
    by_batch: dict[str, float] = {}
    for batch in (1, 8, 32, 64, 128, 256):
        feeds = {k: np.repeat(v, batch, axis=0) for k, v in one.items()}
        model.run(feeds)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 0.5:
            model.run(feeds)
            runs += 1
        by_batch[str(batch)] = runs * batch / (time.perf_counter() - started)
    best = max(by_batch, key=lambda b: by_batch[b])
    return {
        "providers": model.providers,
        "batch1_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "rows_per_s_by_batch": by_batch,
        "best_batch": best,
        "best_rows_per_s": by_batch[best],
    }


def bench_function(name: str, options: BenchOptions) -> dict[str, Any]:
    handler = load_handler(name)
    example = handler.example()
    duration = options.duration
    report: dict[str, Any] = {"providers": options.providers}
    say(f"raw onnxruntime ({options.providers}) ...")
    report["raw"] = raw_onnxruntime(name) if options.providers == "cpu" else raw_accelerated(name, options.providers)
    server_env = {"ONNXFN_LOG_LEVEL": "warning", "ONNXFN_PROVIDERS": options.providers, **options.server_env}

    say("function (binary-mode CloudEvents) ...")
    headers, body = _event_headers(name), orjson.dumps(example)
    server = FunctionProcess(name, env=server_env)
    try:
        server.wait_ready()
        run_hey(server.url + "/", headers, body, 8, 1.0)
        report["function"] = {}
        for c in options.concurrencies:
            before = _batch_stats(server.url)
            phase = _phase(run_hey(server.url + "/", headers, body, c, duration))
            after = _batch_stats(server.url)
            rows, runs = after[0] - before[0], after[1] - before[1]
            phase["mean_batch"] = rows / runs if runs else 0.0
            report["function"][f"c{c}"] = phase
        if name == "digits":
            say(f"function (batched CloudEvents, {BATCHED_EVENTS} events a request) ...")
            batch_headers = {"Content-Type": "application/cloudevents-batch+json"}
            batch_body = _batch_body(name, example, BATCHED_EVENTS)
            report["function"]["batched"] = _phase(
                run_hey(server.url + "/", batch_headers, batch_body, 4, duration),
                BATCHED_EVENTS,
            )
        report["worker_rss_mb"] = [rss_mb(pid) for pid in server.worker_pids()]
    finally:
        server.stop()

    say("cold start ...")
    report["cold_start"] = cold_start(name, headers, body, server_env)
    # The limit is the best the machine showed: measure raw again at the end and keep the better run.
    say("raw onnxruntime again ...")
    again = raw_onnxruntime(name) if options.providers == "cpu" else raw_accelerated(name, options.providers)
    if again["best_rows_per_s"] > report["raw"]["best_rows_per_s"]:
        report["raw"] = again
    report["ratios"] = ratios(report)
    return report


def ratios(report: dict[str, Any]) -> dict[str, float]:
    fn, raw = report["function"], report["raw"]
    top = max(fn[k]["req_per_s"] for k in fn if k != "batched")
    out = {"best_vs_raw_limit": top / raw["best_rows_per_s"]}
    if "c32" in fn:
        out["c32_vs_raw_limit"] = fn["c32"]["req_per_s"] / raw["best_rows_per_s"]
    if "c1" in fn:
        out["c1_p50_minus_raw_batch1_ms"] = fn["c1"]["p50_ms"] - raw["batch1_p50_ms"]
    return out


def print_report(report: dict[str, dict[str, Any]]) -> None:
    for name, r in report.items():
        raw = r["raw"]
        print(f"\n{name} on {r['providers']}:", end="")
        print(
            f" raw onnxruntime batch-1 p50 {raw['batch1_p50_ms']:.3f} ms, "
            f"best {raw['best_rows_per_s']:.0f} rows/s at batch {raw['best_batch']}"
        )
        print(f"{'setup':<34}{'req/s':>10}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}  non-200")
        rows = [(f"function {k}", v) for k, v in r["function"].items()]
        for label, v in rows:
            bad = {k: n for k, n in v["statuses"].items() if k != 200}
            if v["errors"]:
                bad["connection errors"] = v["errors"]
            print(
                f"{label:<34}{v['req_per_s']:>10.0f}{v['events_per_s']:>10.0f}{v['p50_ms']:>9.2f}"
                f"{v['p99_ms']:>9.2f}{v.get('mean_batch', 0):>7.1f}  {bad or ''}"
            )
        cold = r["cold_start"]
        print(
            f"cold start: first reply {cold['first_reply_s']:.3f} s = imports+boot {cold['imports_and_boot_s']:.3f}"
            f" + load {cold['model_load_s'] or 0:.3f} + warm-up {cold['warmup_s'] or 0:.3f}"
            f" + first request {cold['ready_to_reply_s']:.3f}"
        )
        print(f"worker RSS MB: {', '.join(f'{m:.0f}' for m in r['worker_rss_mb'])}")
        print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))

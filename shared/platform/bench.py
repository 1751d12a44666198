"""`onnxfn platform-bench`: what the embedded platform costs and gives, measured end to end.

Runs `onnxfn platform` as its own process (so the load generator does not share its interpreter)
on a copy of the CPU Service files in which digits has v1 (tag `current`, 100 %) and v2 INT8 (tag
`candidate`, 0 %), then measures:

    cold starts   first request to a revision at zero -> reply, digits and embed, with their parts
    warm overhead p50/p99 at concurrency 1 through the activator vs directly to the same process
    burst         500 requests on 500 connections arriving while digits is at zero
    INT8 vs FP32  held-out accuracy and one-thread latency (onnxruntime), and served p50 / rate
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from shared.bench.loadgen import LoadResult, run_load
from shared.build_models import default_model_dir, ensure_models
from shared.config import PROJECT_ROOT
from shared.contract import load_handler
from shared.platform.child import PlatformProcess, scaling_flags
from shared.process import free_port
from shared.traffic import update_file


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _request(function: str) -> tuple[dict[str, str], bytes]:
    headers = {
        "Content-Type": "application/json",
        "Ce-Specversion": "1.0",
        "Ce-Id": "bench",
        "Ce-Source": "/onnxfn/platform-bench",
        "Ce-Type": load_handler(function).config.accepts[0],
    }
    return headers, orjson.dumps(load_handler(function).example())


def _port(url: str) -> int:
    return urlsplit(url).port or 80


def start_platform(knative: Path, services: list[str], idle_window_s: float, log: Path) -> PlatformProcess:
    """`onnxfn platform` on a free port over `knative`, started and listening."""
    platform = PlatformProcess(
        services,
        knative_dir=knative,
        state_file=knative / "state.json",
        gateway_port=free_port(),
        scaling_flags=scaling_flags(idle_window_s, None, None),
        log=log,
    )
    return platform.start()


def prepare(directory: Path) -> Path:
    """CPU Service files with digits v1 `current` 100 % and v2 `candidate` 0 % (as `onnxfn traffic` would)."""
    knative = directory / "knative"
    knative.mkdir()
    for path in (PROJECT_ROOT / "knative" / "cpu").glob("service-*.yaml"):
        shutil.copy(path, knative / path.name)
    digits = knative / "service-digits.yaml"
    digits.write_text(update_file(digits, [], ["digits-v2-cpu=candidate"], []))
    return knative


def _load(url: str, function: str, concurrency: int, duration: float, count: int = 10**9) -> LoadResult:
    headers, body = _request(function)
    return run_load(
        "127.0.0.1", _port(url), "/", headers, body, concurrency=concurrency, count=count, duration=duration
    )


def cold_starts(platform: PlatformProcess, function: str, runs: int) -> list[dict[str, Any]]:
    """First request at zero -> reply, seen by the client and by the platform (with parts)."""
    out = []
    for _ in range(runs):
        platform.wait_zero(function)
        started = time.perf_counter()
        result = _load(platform.url_for(function), function, 1, 60, count=1)
        client_s = time.perf_counter() - started
        if result.ok != 1:
            raise RuntimeError(f"{function}: cold request failed: {result.statuses}")
        cold = platform.revision(function)["last_cold_start"]
        out.append({"client_s": client_s, "platform_s": cold["seconds"], "parts": cold["parts"]})
        say(f"  {function} cold start {client_s:.3f} s (platform {cold['seconds']:.3f} s)")
    return out


def warm_overhead(platform: PlatformProcess, function: str, rounds: int, duration: float) -> dict[str, Any]:
    """p50/p99 at concurrency 1, through the activator and direct to the same process, interleaved."""
    url = platform.url_for(function)
    _load(url, function, 1, 0.5)  # wake it and warm both paths
    direct = f"http://127.0.0.1:{platform.revision(function)['processes'][0]['port']}/"
    _load(direct, function, 1, 0.5)
    via: list[LoadResult] = []
    plain: list[LoadResult] = []
    for _ in range(rounds):
        via.append(_load(url, function, 1, duration))
        plain.append(_load(direct, function, 1, duration))

    def ms(results: list[LoadResult], q: float) -> float:
        return statistics.median(r.percentile(q) for r in results) * 1000

    report = {
        "activator_p50_ms": ms(via, 50),
        "direct_p50_ms": ms(plain, 50),
        "activator_p99_ms": ms(via, 99),
        "direct_p99_ms": ms(plain, 99),
        "requests": sum(r.ok for r in via) + sum(r.ok for r in plain),
        "errors": sum(r.errors + sum(n for s, n in r.statuses.items() if s != 200) for r in via + plain),
    }
    report["overhead_p50_ms"] = report["activator_p50_ms"] - report["direct_p50_ms"]
    return report


def burst(platform: PlatformProcess, function: str, size: int) -> dict[str, Any]:
    """`size` requests on `size` connections at once while `function` is at zero."""
    platform.wait_zero(function)
    result = _load(platform.url_for(function), function, size, 120, count=size)
    return {
        "sent": size,
        "ok": result.ok,
        "errors": result.errors,
        "statuses": {str(k): v for k, v in result.statuses.items()},
        "elapsed_s": result.elapsed,
        "p50_ms": result.percentile(50) * 1000,
        "max_ms": max(result.latencies, default=0.0) * 1000,
    }


def int8_vs_fp32(platform: PlatformProcess, model_dir: Path, duration: float) -> dict[str, Any]:
    """Accuracy and onnxruntime latency per version (the build module's `compare_versions`); served
    p50 (c=1) and rate (c=32) per tag URL."""
    from shared.build_models import build_module

    report: dict[str, Any] = {"onnxruntime_one_thread": build_module("digits").compare_versions(model_dir)}
    served = {}
    for tag, version in (("current", "1"), ("candidate", "2")):
        url = platform.url_for("digits", tag)
        _load(url, "digits", 1, 0.3)
        c1 = _load(url, "digits", 1, duration)
        c32 = _load(url, "digits", 32, duration)
        served[version] = {"p50_ms": c1.percentile(50) * 1000, "rate_c32": c32.rate}
    report["served"] = served
    return report


def print_report(report: dict[str, Any]) -> None:
    for function, runs in report["cold_starts"].items():
        best = min(runs, key=lambda r: r["client_s"])
        parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in best["parts"].items())
        worst = max(r["client_s"] for r in runs)
        print(f"cold start {function:<7} best {best['client_s']:.3f} s, worst {worst:.3f} s  ({parts})")
    w = report["warm"]
    print(
        f"warm digits c=1: activator p50 {w['activator_p50_ms']:.3f} ms, direct {w['direct_p50_ms']:.3f} ms, "
        f"overhead {w['overhead_p50_ms']:.3f} ms (p99 {w['activator_p99_ms']:.3f} vs {w['direct_p99_ms']:.3f} ms)"
    )
    b = report["burst"]
    print(
        f"burst of {b['sent']} at zero: {b['ok']} ok, {b['errors']} connection errors, statuses {b['statuses']}, "
        f"all answered in {b['elapsed_s']:.2f} s (p50 {b['p50_ms']:.0f} ms, max {b['max_ms']:.0f} ms)"
    )
    q = report["int8_vs_fp32"]
    for version, name in (("1", "FP32 v1"), ("2", "INT8 v2")):
        ort_ = q["onnxruntime_one_thread"].get(version, {})
        served = q["served"][version]
        print(
            f"{name}: accuracy {ort_.get('accuracy', float('nan')):.4f}, onnxruntime batch 1 "
            f"{ort_.get('batch1_us', float('nan')):.1f} us, batch 64 {ort_.get('batch64_us', float('nan')):.0f} us; "
            f"served p50 {served['p50_ms']:.3f} ms, {served['rate_c32']:.0f} req/s at c=32"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cold-runs", type=int, default=3, help="cold starts per function")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved warm rounds (activator, direct)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per warm measurement")
    parser.add_argument("--burst", type=int, default=500, help="requests in the burst at zero")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    model_dir = default_model_dir()
    ensure_models(model_dir, ["digits", "embed"])
    with tempfile.TemporaryDirectory(prefix="onnxfn-platform-bench-") as tmp:
        knative = prepare(Path(tmp))
        say("starting onnxfn platform (digits, embed; idle window 1 s) ...")
        platform = start_platform(knative, ["digits", "embed"], 1.0, Path(tmp) / "platform.log")
        report: dict[str, Any] = {"cold_starts": {}}
        try:
            for function in ("digits", "embed"):
                report["cold_starts"][function] = cold_starts(platform, function, args.cold_runs)
            say(f"burst of {args.burst} at zero ...")
            report["burst"] = burst(platform, "digits", args.burst)
        finally:
            platform.stop()
        # Warm figures on a platform that keeps the process while the direct calls bypass the activator.
        say("restarting onnxfn platform (digits; idle window 600 s) ...")
        platform = start_platform(knative, ["digits"], 600.0, Path(tmp) / "platform-warm.log")
        try:
            say("warm overhead (digits, c=1) ...")
            report["warm"] = warm_overhead(platform, "digits", args.rounds, args.duration)
            say("INT8 vs FP32 ...")
            report["int8_vs_fp32"] = int8_vs_fp32(platform, model_dir, args.duration)
        finally:
            platform.stop()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0

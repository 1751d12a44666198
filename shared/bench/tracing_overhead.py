"""`onnxfn bench --tracing`: what recording traces costs a function, measured with hey.

Each round serves the function with tracing off and on at 10% of new traces (spans written to a
folder as `onnxfn up` does), the order alternating round by round; then, for scale, a few runs
with every trace kept (`OTEL_TRACES_SAMPLER_ARG=1`). hey posts binary-mode CloudEvents with no
`traceparent` (each request starts a trace, sampled at the ratio) at one concurrency. Reported:
median requests/s with the spread over rounds, server CPU ms per request, and the on/off ratios
of both; the budget (10% sampling within 5% of off) is judged on capacity, 1 / CPU per request,
since req/s with hey on the same cores varies more between rounds than tracing costs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from shared import tracing
from shared.bench.hey import run_hey, tree_cpu_seconds
from shared.process import FunctionProcess
from shared.progress import steps

MODES = {"off": None, "10%": "0.1", "100%": "1"}
BUDGET = 0.95  # 10% sampling keeps at least this share of the throughput with tracing off


def _serve_and_load(function: str, ratio: str | None, concurrency: int, seconds: float) -> dict[str, float]:
    from shared.bench.functions import _event_headers
    from shared.contract import load_handler

    env: dict[str, str] = {"OTEL_SDK_DISABLED": "true", "ONNXFN_LOG_LEVEL": "warning"}
    with tempfile.TemporaryDirectory(prefix="onnxfn-trace-bench-") as spans:
        if ratio is not None:
            env = {tracing.TRACE_DIR_ENV: spans, "OTEL_TRACES_SAMPLER_ARG": ratio, "OTEL_BSP_SCHEDULE_DELAY": "500",
                   "ONNXFN_LOG_LEVEL": "warning"}  # fmt: skip
        with FunctionProcess(function, env=env) as server:
            server.wait_ready()
            headers, body = _event_headers(function), orjson.dumps(load_handler(function).example())
            run_hey(server.url, headers, body, concurrency, 1.0)  # warm-up
            cpu_before = tree_cpu_seconds(server.proc.pid)
            result = run_hey(server.url, headers, body, concurrency, seconds)
            cpu = tree_cpu_seconds(server.proc.pid) - cpu_before
        kept = len(tracing.read_spans(Path(spans))) if ratio is not None else 0
    if result.ok == 0:
        raise RuntimeError(f"{function}: hey got no 200 answers ({result.statuses}, {result.errors} errors)")
    return {
        "req_per_s": result.req_per_s,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "cpu_ms_per_req": 1000 * cpu / result.ok,
        "spans_kept": kept,
        "non_200": sum(n for code, n in result.statuses.items() if code != 200) + result.errors,
    }


def bench_tracing(function: str, rounds: int, concurrency: int, seconds: float) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    plan = [(n, ["off", "10%"] if n % 2 == 0 else ["10%", "off"]) for n in range(rounds)]
    plan += [(rounds + n, ["100%"]) for n in range(max(1, rounds // 3))]
    for number, modes in steps(plan, f"{function}: tracing runs", unit="round"):
        for mode in modes:
            print(f"run {number + 1}/{len(plan)}: {function}, tracing {mode}, c={concurrency} ...", file=sys.stderr)
            runs[mode].append(_serve_and_load(function, MODES[mode], concurrency, seconds))
    summary: dict[str, Any] = {}
    for mode, results in runs.items():
        rates = [r["req_per_s"] for r in results]
        summary[mode] = {
            "req_per_s": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "cpu_ms_per_req": statistics.median(r["cpu_ms_per_req"] for r in results),
            "spans_kept": statistics.median(r["spans_kept"] for r in results),
            "non_200": sum(r["non_200"] for r in results),
        }
    off, off_cpu = summary["off"]["req_per_s"], summary["off"]["cpu_ms_per_req"]
    ratios = {f"{mode}_over_off": summary[mode]["req_per_s"] / off for mode in MODES if mode != "off"}
    # Capacity (requests per CPU second) on/off: what the server can do, less noisy here than req/s
    # with hey on the same two cores.
    on_modes = [mode for mode in MODES if mode != "off"]
    ratios |= {f"{mode}_capacity_over_off": off_cpu / summary[mode]["cpu_ms_per_req"] for mode in on_modes}
    return {
        "function": function,
        "rounds": rounds,
        "concurrency": concurrency,
        "seconds": seconds,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "modes": summary,
        "runs": runs,
        "ratios": ratios,
        "within_budget": ratios["10%_capacity_over_off"] >= BUDGET,
    }


def print_tracing(report: dict[str, Any]) -> None:
    rounds = f"{report['rounds']} rounds of {report['seconds']:g} s"
    print(f"\n{report['function']} under hey c={report['concurrency']}, {rounds}")
    print(f"{'tracing':<8} {'req/s median (min-max)':>26} {'p99 ms':>8} {'CPU ms/req':>11} {'spans kept':>11}")
    for mode, row in report["modes"].items():
        spread = f"{row['req_per_s']:,.0f} ({row['min']:,.0f}-{row['max']:,.0f})"
        print(
            f"{mode:<8} {spread:>26} {row['p99_ms']:>8.1f} {row['cpu_ms_per_req']:>11.3f} {row['spans_kept']:>11,.0f}"
        )
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in report["ratios"].items())
    verdict = "yes" if report["within_budget"] else "NO"
    print(f"ratios: {ratios}; 10% sampling within 5% of off (capacity, 1/CPU per request): {verdict}")


def run(function: str, rounds: int, concurrency: int, seconds: float, out: Path) -> int:
    report = bench_tracing(function, rounds, concurrency, seconds)
    print_tracing(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"written {out}")
    return 0 if report["within_budget"] else 1

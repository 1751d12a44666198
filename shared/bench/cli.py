"""`onnxfn bench --peers`: onnxfn beside naive Flask, KServe and MLServer on the reference MLP and CNN
and on digits, loaded by `hey`, in one interleaved run (shared/bench/compare.py).

`onnxfn bench` (no --peers): in one run, for `digits` and `embed`: raw in-process onnxruntime (the
limit), the function loaded by `hey` with binary-mode CloudEvents at concurrency 1, 8 and 32,
batched CloudEvents (64 events a request) for digits, and the cold start. Prints a table of
figures and ratios from this one run and writes JSON. The event path and the platform have their
own: `onnxfn bench-events`, `onnxfn platform-bench`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("bench-results/bench.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", action="store_true", help="compare with naive Flask, KServe and MLServer")
    parser.add_argument("--models", default="mlp,cnn,digits", help="with --peers: models to compare")
    parser.add_argument("--systems", default="onnxfn,naive,kserve,mlserver", help="with --peers: systems")
    parser.add_argument("--rounds", type=int, default=3, help="with --peers: rounds (server order rotated)")
    parser.add_argument("--functions", default="digits,embed", help="comma-separated functions")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load phase")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument("--providers", default="cpu", choices=["cpu", "cuda", "tensorrt"])
    parser.add_argument("--workers", type=int, help="gunicorn workers for the function (default: its config)")
    parser.add_argument(
        "--tracing", action="store_true", help="what traces cost: the first of --functions, tracing off / 10%% / 100%%"
    )
    parser.add_argument("--plot", action="store_true", help="also write PNGs next to the JSON (onnxfn plot)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def run(args: argparse.Namespace) -> int:
    if args.peers:
        return run_peers(args)
    if args.tracing:
        from shared.bench import tracing_overhead

        concurrency = int(args.concurrency.split(",")[-1])
        out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("bench-tracing.json")
        return tracing_overhead.run(args.functions.split(",")[0], args.rounds, concurrency, args.duration, out)
    from shared.bench.functions import BenchOptions, bench_function, print_report

    options = BenchOptions(
        duration=args.duration,
        concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
        providers=args.providers,
        server_env={"ONNXFN_WORKERS": str(args.workers)} if args.workers else {},
    )
    report = {}
    for name in args.functions.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        report[name] = bench_function(name, options)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")
    _plot(args, report, args.out)
    return 0


def _plot(args: argparse.Namespace, report: dict[str, Any], out: Path) -> None:
    if args.plot:
        from shared.bench.plots import plot

        for png in plot(report, out):
            print(f"wrote {png}")


def run_peers(args: argparse.Namespace) -> int:
    from shared.bench.compare import CompareOptions, compare, print_report, write

    options = CompareOptions(
        models=tuple(args.models.split(",")),
        systems=tuple(args.systems.split(",")),
        concurrencies=tuple(int(c) for c in args.concurrency.split(",")),
        rounds=args.rounds,
        seconds=args.duration,
    )
    report = compare(options)
    print_report(report)
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("peers.json")
    write(report, out)
    _plot(args, report, out)
    return 0

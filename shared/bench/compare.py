"""`onnxfn bench --peers`: onnxfn against what users would pick instead, in one interleaved run.

For each model (the reference MLP and CNN, and digits), for each round, the systems start in an
order rotated by the round: each is launched (cold start = launch to its first valid reply), loaded
by `hey` at every concurrency, its server CPU read from /proc around each phase, then stopped.
Raw onnxruntime in-process (the limit: best rows/s over batch sizes and process layouts) is
measured in the same run. The report gives medians with [min-max] over rounds, and every ratio
from these medians.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.bench.hey import run_hey, tree_cpu_seconds
from shared.bench.peer_systems import SYSTEMS, Launch, Target, launch
from shared.config import PROJECT_ROOT
from shared.progress import steps
from shared.supervisor import ChildProcess


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CompareOptions:
    models: tuple[str, ...] = ("mlp", "cnn", "digits")
    systems: tuple[str, ...] = SYSTEMS
    concurrencies: tuple[int, ...] = (1, 8, 32)
    rounds: int = 3
    seconds: float = 5.0


def targets(models: tuple[str, ...]) -> list[Target]:
    from shared.bench.reference_models import ensure_built, example_row

    paths = ensure_built(PROJECT_ROOT / "models" / "bench")
    found = []
    for name in models:
        if name in paths:
            found.append(Target(name, paths[name], example_row(name)))
        elif name == "digits":
            from shared.config import Settings
            from shared.contract import load_handler

            handler = load_handler("digits")
            image = [list(map(float, row)) for row in handler.example()["image"]]
            model = Settings.from_env(function="digits").model_dir / str(handler.config.model_file)
            found.append(Target("digits", model, [image], "digits", {"image": image}))
        else:
            raise SystemExit(f"unknown bench model {name!r} (mlp, cnn, digits)")
    return found


def _post(run: Launch, timeout: float = 5.0) -> int:
    request = urllib.request.Request(run.url + run.path, data=run.body, headers=run.headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


LOG_DIR = PROJECT_ROOT / "bench-results" / "logs"


def start(run: Launch, timeout: float = 120.0) -> tuple[ChildProcess, float]:
    """Start the system (its output in bench-results/logs/SYSTEM.log); returns the process and its
    cold start (launch to the first 200 reply)."""
    log_path = LOG_DIR / f"{run.system.replace('/', '_')}.log"
    launched = time.perf_counter()
    child = ChildProcess(run.system, run.argv, env=run.env, cwd=run.cwd, log=log_path).start()
    child.wait_until(lambda: _post(run, timeout=2.0) == 200, timeout, poll_s=0.005)
    return child, time.perf_counter() - launched


def measure_system(run: Launch, options: CompareOptions) -> dict[str, Any]:
    proc, cold = start(run)
    try:
        _warm(run)
        phases: dict[str, Any] = {}
        for concurrency in options.concurrencies:
            before = tree_cpu_seconds(proc.pid)
            result = run_hey(run.url + run.path, run.headers, run.body, concurrency, options.seconds)
            cpu = tree_cpu_seconds(proc.pid) - before
            phases[str(concurrency)] = {
                "req_per_s": result.req_per_s,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "cpu_ms_per_req": cpu * 1000 / result.ok if result.ok else float("nan"),
                "statuses": result.statuses,
                "errors": result.errors,
            }
    finally:
        code = proc.stop()
        if run.workdir is not None:
            run.workdir.cleanup()
    return {"cold_start_s": cold, "phases": phases, "exit_code": code}


def _warm(run: Launch) -> None:
    """A second of requests before measuring (every worker gets its first requests)."""
    run_hey(run.url + run.path, run.headers, run.body, 8, 1.0)


def raw_limit(target: Target, seconds: float = 1.5) -> dict[str, Any]:
    """In-process onnxruntime on this machine: best rows/s over batch sizes, with one process using
    every core or one single-threaded process per core, each in its own interpreter."""
    from shared.config import available_cores

    cores = available_cores()
    results: dict[str, float] = {}
    for processes, threads in ((1, cores), (cores, 1)):
        for batch in (1, 8, 32, 128):
            argv = [sys.executable, "-m", "shared.bench.raw", str(target.path), str(batch), str(threads), str(seconds)]
            procs = [
                subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT) for _ in range(processes)
            ]
            total = sum(float(p.communicate()[0].strip() or 0) for p in procs)
            results[f"{processes}x{threads} threads, batch {batch}"] = total
    best = max(results, key=lambda k: results[k])
    return {"rows_per_s": results, "best": best, "best_rows_per_s": results[best]}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(options: CompareOptions) -> dict[str, Any]:
    report: dict[str, Any] = {"options": options.__dict__, "models": {}}
    for target in targets(options.models):
        say(f"== {target.name}: raw onnxruntime ...")
        rounds: dict[str, list[dict[str, Any]]] = {system: [] for system in options.systems}
        model_report: dict[str, Any] = {"raw": raw_limit(target)}
        for index in steps(range(options.rounds), f"{target.name}: rounds", unit="round"):
            order = options.systems[index % len(options.systems) :] + options.systems[: index % len(options.systems)]
            for system in order:
                say(f"   round {index + 1}/{options.rounds}: {system} ...")
                run = launch(system, target, say)
                run.system = system
                rounds[system].append(measure_system(run, options))
        model_report["systems"] = {system: aggregate(runs, options) for system, runs in rounds.items()}
        model_report["rounds"] = rounds
        report["models"][target.name] = model_report
    return report


def aggregate(runs: list[dict[str, Any]], options: CompareOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"cold_start_s": _summary([r["cold_start_s"] for r in runs])}
    out["exit_codes"] = sorted({r["exit_code"] for r in runs})
    for concurrency in options.concurrencies:
        phases = [r["phases"][str(concurrency)] for r in runs]
        out[f"c{concurrency}"] = {
            key: _summary([p[key] for p in phases]) for key in ("req_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req")
        }
        out[f"c{concurrency}"]["non_200"] = sum(
            n for p in phases for code, n in p["statuses"].items() if int(code) != 200
        ) + sum(p["errors"] for p in phases)
    return out


def _fmt(summary: dict[str, float], digits: int = 0) -> str:
    return f"{summary['median']:,.{digits}f} [{summary['min']:,.{digits}f}-{summary['max']:,.{digits}f}]"


def print_report(report: dict[str, Any]) -> None:
    options = report["options"]
    top = max(options["concurrencies"])
    for name, model in report["models"].items():
        raw = model["raw"]
        print(f"\n## {name}: raw onnxruntime best {raw['best_rows_per_s']:,.0f} rows/s ({raw['best']})")
        header = ["system", *[f"c={c} req/s" for c in options["concurrencies"]], f"c={top} p99 ms"]
        header += [f"CPU ms/req c={top}", "cold start s", "exit"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        systems = model["systems"]
        for system, stats in systems.items():
            cells = [system, *[_fmt(stats[f"c{c}"]["req_per_s"]) for c in options["concurrencies"]]]
            cells += [_fmt(stats[f"c{top}"]["p99_ms"], 1), _fmt(stats[f"c{top}"]["cpu_ms_per_req"], 3)]
            cells += [_fmt(stats["cold_start_s"], 2), ",".join(map(str, stats["exit_codes"]))]
            print("| " + " | ".join(cells) + " |")
        ours = systems.get("onnxfn")
        if ours is None:
            continue
        ratios = []
        for system, stats in systems.items():
            if system == "onnxfn":
                continue
            rate = ours[f"c{top}"]["req_per_s"]["median"] / stats[f"c{top}"]["req_per_s"]["median"]
            cpu = ours[f"c{top}"]["cpu_ms_per_req"]["median"] / stats[f"c{top}"]["cpu_ms_per_req"]["median"]
            cold = ours["cold_start_s"]["median"] - stats["cold_start_s"]["median"]
            ratios.append(f"vs {system}: c={top} req/s x{rate:.2f}, CPU/req x{cpu:.2f}, cold start {cold:+.2f} s")
        best_rate = ours[f"c{top}"]["req_per_s"]["median"] / raw["best_rows_per_s"]
        ratios.append(f"onnxfn c={top} / raw onnxruntime best: {best_rate:.2f}")
        print("\n".join("- " + r for r in ratios))


def write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out}")

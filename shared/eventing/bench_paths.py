"""`onnxfn bench-events --mode worker`: the HTTP-trigger path and the Kafka-native worker, in one run.

On one broker, for each round and each path (`http`: the plane delivers batched CloudEvents over
HTTP to the function's processes; `worker`: `onnxfn worker` reads the broker topic), `onnxfn up`
runs the repository's eventing YAML with every function's Trigger (digits, embed, postprocess) in
that mode, and for each of digits and embed:

1. at zero: a burst of `--cold-burst` events; the first result's delay and, for the worker, its
   cold start (process start to ready, as `up` prints it);
2. steady: `--rate` events/s for `--steady-seconds`;
3. full speed: `--burst` events (embed: a tenth) produced at once;
4. the function hop alone: as many requests put straight on the broker topic, their results read
   back there (what a worker replaces: the trigger's HTTP delivery and the function's HTTP layer).

Latency is from produce on the input topic to arrival on the function's result topic (through the
KafkaSource, the broker topic and its triggers, the result KafkaSink). Each phase counts what never
arrived and what arrived twice, and the CPU of `up` and everything under it per event. Raw
onnxruntime's best rows/s on the same machine is measured first for the ratios (embed's events
carry the sentence raw onnxruntime runs). Medians over `--rounds`.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import yaml

from shared.eventing import bench
from shared.eventing.spec import BATCH_ANNOTATION, DELIVERY_ANNOTATION
from shared.progress import steps

ROOT = Path(__file__).resolve().parents[2]
RESULT_TOPICS = {"digits": "onnxfn.digits.results", "embed": "onnxfn.embed.results"}
MODES = ("http", "worker")
BROKER_TOPIC = "knative-broker-default-default"
EMBED_SHARE = 10  # embed's full-speed burst: a tenth of digits' (a model run costs ~100x more)


def eventing_for(mode: str, directory: Path) -> Path:
    """The repository's eventing YAML with every Trigger that feeds a function (digits, embed,
    postprocess) delivered `mode`: with `worker`, no HTTP hop is left on the event path."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted((ROOT / "eventing").glob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))
        for doc in docs:
            ref = (doc or {}).get("spec", {}).get("subscriber", {}).get("ref", {})
            if doc and doc.get("kind") == "Trigger" and ref.get("kind") == "Service":
                notes = doc["metadata"].setdefault("annotations", {})
                notes.pop(DELIVERY_ANNOTATION, None)
                notes.pop(BATCH_ANNOTATION, None)
                notes.update({DELIVERY_ANNOTATION: "worker"} if mode == "worker" else {BATCH_ANNOTATION: "32"})
        (directory / path.name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


class Plane:
    """`onnxfn up` on the given broker with `eventing`, its output read in a thread."""

    def __init__(self, servers: str, eventing: Path) -> None:
        command = [
            sys.executable,
            "-m",
            "shared.cli",
            "up",
            "--bootstrap-servers",
            servers,
            "--eventing",
            str(eventing),
        ]
        command += ["--samples", "0", "--quiet", "--ingress-port", "0"]
        command += ["--state-file", str(Path(tempfile.gettempdir()) / f"onnxfn-bench-paths-{os.getpid()}.json")]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.timed: list[tuple[float, str]] = []  # (time.time() when read, line)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.stop()
            raise RuntimeError("onnxfn up was not ready in 120 s:\n" + "\n".join(self.lines[-20:]))

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self.timed.append((time.time(), self.lines[-1]))
            if line.strip() == "READY":
                self.ready.set()

    def worker_ready(self, function: str) -> tuple[float, float] | None:
        """(cold start s as the worker's line says, when `up` printed it) of the function's first worker."""
        pattern = re.compile(rf"^worker {function}: started on lag \d+, ready in (\S+) s$")
        found = [(float(m.group(1)), at) for at, line in self.timed if (m := pattern.match(line))]
        return found[0] if found else None

    def cpu_s(self) -> float:
        from shared.bench.hey import tree_cpu_seconds

        return tree_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _phase(
    plane: Plane,
    producer: Any,
    arrivals: bench.Arrivals,
    function: str,
    count: int,
    rate: float | None,
    topic: str = bench.INPUT_TOPIC,
) -> dict[str, Any]:
    before = plane.cpu_s()
    copies_before = dict(arrivals.copies)
    result = bench.pipeline_phase(producer, arrivals, count, rate, function, topic)
    ids = result.pop("ids")
    result["duplicates"] = sum(max(0, arrivals.copies.get(i, 0) - copies_before.get(i, 0) - 1) for i in ids)
    result["lost"] = result["events"] - result["arrived"]
    result["cpu_ms_per_event"] = 1000 * (plane.cpu_s() - before) / max(result["arrived"], 1)
    return result


def one_path(kafka: Any, mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plane = Plane(kafka.bootstrap_servers, eventing_for(mode, workdir / mode))
    out: dict[str, Any] = {}
    try:
        producer = bench.ready_producer(kafka)
        for function, topic in RESULT_TOPICS.items():
            arrivals = bench.Arrivals(kafka, topic)
            try:
                burst = args.burst if function == "digits" else max(1, args.burst // EMBED_SHARE)
                bench.say(f"  {mode} {function}: cold burst {args.cold_burst}, steady {args.rate:g}/s, full {burst}")
                cold = _phase(plane, producer, arrivals, function, args.cold_burst, None)
                ready = plane.worker_ready(function) if mode == "worker" else None
                cold["cold_start_s"] = ready[0] if ready else None
                # from the first send to the worker's readiness: lag seen, process launched, cold start
                cold["ready_after_send_s"] = ready[1] - cold["started_at"] if ready else None
                steady = _phase(plane, producer, arrivals, function, int(args.rate * args.steady_seconds), args.rate)
                full = _phase(plane, producer, arrivals, function, burst, None)
            finally:
                arrivals.stop()
            # The hop a worker replaces alone: requests put on the broker topic, results read there.
            hop_arrivals = bench.Arrivals(kafka, BROKER_TOPIC, f"dev.onnxfn.{function}.result")
            try:
                hop = _phase(plane, producer, hop_arrivals, function, burst, None, BROKER_TOPIC)
            finally:
                hop_arrivals.stop()
            out[function] = {"cold": cold, "steady": steady, "full_speed": full, "function_hop": hop}
        producer.flush(10)
    finally:
        plane.stop()
    return out


def _median(runs: list[dict[str, Any]], *path: str) -> dict[str, float]:
    values = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        values.append(float(node))
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(args: argparse.Namespace) -> int:
    from shared.bench.functions import raw_onnxruntime
    from shared.eventing.cliutil import connect

    bench.say("raw onnxruntime, all cores (best rows/s over batch sizes) ...")
    raw = {name: raw_onnxruntime(name) for name in RESULT_TOPICS}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="onnxfn-bench-paths-") as tmp:
        for round_index in steps(range(args.rounds), "event paths: rounds", unit="round"):
            for mode in MODES if round_index % 2 == 0 else reversed(MODES):
                bench.say(f"round {round_index + 1}/{args.rounds}: {mode} path (onnxfn up) ...")
                # A fresh embedded broker for each: Tansu's fetch cost grows with its log, which
                # would favour whichever path runs first.
                kafka, broker = connect(args.bootstrap_servers)
                try:
                    runs[mode].append(one_path(kafka, mode, args, Path(tmp) / f"r{round_index}"))
                finally:
                    if broker is not None:
                        broker.stop()
    report = summarize(raw, runs)
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    report["broker"] = args.bootstrap_servers or "embedded Tansu (a fresh one per path and round)"
    report["settings"] = {k: getattr(args, k) for k in ("rounds", "cold_burst", "rate", "steady_seconds", "burst")}
    print_report(report)
    path = args.json.with_name(args.json.stem + "-paths.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"wrote {path}")
    return 0 if all(report["targets"].values()) else 1


PHASES = ("cold", "steady", "full_speed", "function_hop")
FIELDS = ("events_per_s", "p50_ms", "p99_ms", "cpu_ms_per_event")


def summarize(raw: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians and spreads per path, function and phase; losses and duplicates summed; ratios."""
    table: dict[str, Any] = {}
    for mode, mode_runs in runs.items():
        for function in RESULT_TOPICS:
            for phase in PHASES:
                row: dict[str, Any] = {f: _median(mode_runs, function, phase, f) for f in FIELDS}
                row["lost"] = sum(r[function][phase]["lost"] for r in mode_runs)
                row["duplicates"] = sum(r[function][phase]["duplicates"] for r in mode_runs)
                row["first_result_s"] = _median(mode_runs, function, phase, "first_ms")
                row["first_result_s"] = {k: v / 1000 for k, v in row["first_result_s"].items()}
                if mode == "worker" and phase == "cold":
                    starts = [r[function]["cold"]["cold_start_s"] for r in mode_runs]
                    row["cold_start_s"] = max(s for s in starts if s is not None) if any(starts) else None
                    after = [r[function]["cold"]["ready_after_send_s"] for r in mode_runs]
                    row["ready_after_send_s"] = max(a for a in after if a is not None) if any(after) else None
                table[f"{mode}/{function}/{phase}"] = row
    speed = {k: v["events_per_s"]["median"] for k, v in table.items()}
    ratios = {
        "digits_worker_over_http": speed["worker/digits/full_speed"] / speed["http/digits/full_speed"],
        "embed_worker_over_http": speed["worker/embed/full_speed"] / speed["http/embed/full_speed"],
        "embed_worker_over_raw_ort": speed["worker/embed/full_speed"] / raw["embed"]["best_rows_per_s"],
        "digits_worker_over_raw_ort": speed["worker/digits/full_speed"] / raw["digits"]["best_rows_per_s"],
        "digits_hop_worker_over_http": speed["worker/digits/function_hop"] / speed["http/digits/function_hop"],
        "embed_hop_worker_over_raw_ort": speed["worker/embed/function_hop"] / raw["embed"]["best_rows_per_s"],
    }
    colds = [r["digits"]["cold"] for r in runs["worker"]]
    lost = sum(row["lost"] for key, row in table.items() if key.startswith("worker/"))
    targets = {
        "digits_worker_ge_5x_http": ratios["digits_worker_over_http"] >= 5,
        "embed_worker_ge_0.8x_raw_ort": ratios["embed_worker_over_raw_ort"] >= 0.8,
        "worker_nothing_lost": lost == 0,
        "worker_first_result_within_cold_start_plus_1s": all(
            c["cold_start_s"] is not None and c["first_ms"] / 1000 <= c["cold_start_s"] + 1.0 for c in colds
        ),
    }
    raw_rows = {name: {k: raw[name][k] for k in ("best_batch", "best_rows_per_s")} for name in raw}
    return {"raw_onnxruntime": raw_rows, "table": table, "ratios": ratios, "targets": targets, "runs": runs}


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{'path/function/phase':<28} {'events/s':>16} {'p50 ms':>9} {'p99 ms':>9} {'CPU ms/ev':>10} "
          f"{'first s':>8} {'lost':>5} {'dups':>5}")  # fmt: skip
    for key, row in report["table"].items():
        speed = row["events_per_s"]
        print(
            f"{key:<28} {speed['median']:>7,.0f} ({speed['min']:,.0f}-{speed['max']:,.0f}) "
            f"{row['p50_ms']['median']:>9.1f} {row['p99_ms']['median']:>9.1f} "
            f"{row['cpu_ms_per_event']['median']:>10.2f} "
            f"{row['first_result_s']['median']:>8.2f} {row['lost']:>5} {row['duplicates']:>5}"
            + (
                f"  worker cold start {row['cold_start_s']:.2f} s,"
                f" ready {row['ready_after_send_s']:.2f} s after the send"
                if row.get("cold_start_s")
                else ""
            )
        )
    for name, raw in report["raw_onnxruntime"].items():
        print(f"raw onnxruntime {name}: {raw['best_rows_per_s']:,.0f} rows/s (batch {raw['best_batch']})")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    print("targets: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in report["targets"].items()))

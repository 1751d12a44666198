"""PNG plots of the benchmark reports, written next to their JSON (`onnxfn plot FILE.json`, or
`--plot` on `onnxfn bench` and `onnxfn bench-events --soak`).

- a peers report (`onnxfn bench --peers`): per model, requests/s and p99 against concurrency for
  every system (medians, min-max bars over the rounds);
- a functions report (`onnxfn bench`): each function's cold start split into its parts;
- a soak report (`onnxfn bench-events --soak`): p50/p99 event-path latency and events behind,
  window by window.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLORS = {"onnxfn": "#2563eb", "naive": "#9ca3af", "kserve": "#f59e0b", "mlserver": "#10b981"}
COLD_PARTS = ("imports_and_boot_s", "model_load_s", "warmup_s", "ready_to_reply_s")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def kind_of(report: dict[str, Any]) -> str:
    """Which benchmark wrote `report`: peers, functions or soak."""
    if "models" in report and "options" in report:
        return "peers"
    if "windows" in report:
        return "soak"
    if any(isinstance(v, dict) and "cold_start" in v for v in report.values()):
        return "functions"
    raise ValueError("not a report of onnxfn bench --peers, onnxfn bench or onnxfn bench-events --soak")


def plot_peers(report: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    concurrencies = report["options"]["concurrencies"]
    written = []
    for model, data in report["models"].items():
        figure, (rate_axis, p99_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
        for system, stats in data["systems"].items():
            for axis, key in ((rate_axis, "req_per_s"), (p99_axis, "p99_ms")):
                rows = [stats[f"c{c}"][key] for c in concurrencies]
                median = [r["median"] for r in rows]
                spread = [[m - r["min"] for m, r in zip(median, rows, strict=True)],
                          [r["max"] - m for m, r in zip(median, rows, strict=True)]]  # fmt: skip
                axis.errorbar(concurrencies, median, yerr=spread, marker="o", capsize=3, label=system,
                              color=COLORS.get(system), linewidth=2.2 if system == "onnxfn" else 1.4)  # fmt: skip
        raw = data["raw"]["best_rows_per_s"]
        rate_axis.set(title=f"{model}: requests/s (raw onnxruntime best {raw:,.0f} rows/s)", xlabel="concurrency")
        p99_axis.set(title=f"{model}: p99 latency", xlabel="concurrency", ylabel="ms")
        for axis in (rate_axis, p99_axis):
            axis.set_xscale("log", base=2)
            axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axis.grid(alpha=0.3)
        rate_axis.legend()
        rounds = report["options"]["rounds"]
        figure.suptitle(f"one interleaved run, {rounds} rounds, hey with keep-alive, one row per request", fontsize=9)
        written.append(_save(plt, figure, out.with_name(f"{out.stem}-{model}.png")))
    return written


def plot_cold_starts(report: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    names = [n for n, v in report.items() if isinstance(v, dict) and "cold_start" in v]
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.6 * len(names)))
    for row, name in enumerate(names):
        cold, left = report[name]["cold_start"], 0.0
        for part in COLD_PARTS:
            width = float(cold.get(part) or 0.0)
            axis.barh(row, width, left=left, label=part.removesuffix("_s").replace("_", " ") if row == 0 else None)
            left += width
        axis.text(left, row, f" {cold['first_reply_s']:.2f} s to the first reply", va="center", fontsize=8)
    axis.set_yticks(range(len(names)), names)
    axis.set(xlabel="seconds from launch", title="cold start: process launch to first reply, by part")
    axis.legend(fontsize=8, loc="lower right")
    return [_save(plt, figure, out.with_name(f"{out.stem}-cold-start.png"))]


def plot_soak(report: dict[str, Any], out: Path) -> list[Path]:
    plt = _pyplot()
    windows = report["windows"]
    at = [w["until_s"] for w in windows]
    figure, latency = plt.subplots(figsize=(9, 4))
    latency.plot(at, [w["p50_ms"] for w in windows], marker=".", label="p50")
    latency.plot(at, [w["p99_ms"] for w in windows], marker=".", label="p99")
    latency.set(xlabel="seconds into the soak", ylabel="event-path latency, ms")
    behind = latency.twinx()
    behind.plot(at, [w["behind"] for w in windows], color="#9ca3af", linestyle="--", label="events behind")
    behind.set_ylabel("events behind")
    lines = latency.get_legend_handles_labels()[0] + behind.get_legend_handles_labels()[0]
    latency.legend(lines, [str(line.get_label()) for line in lines], fontsize=8)
    rate = report.get("rate")
    latency.set_title(f"soak{f' at {rate:g} events/s' if rate else ''}: latency window by window")
    latency.grid(alpha=0.3)
    return [_save(plt, figure, out.with_name(f"{out.stem}.png"))]


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs of `report` (its JSON at `out`), next to it."""
    kind = kind_of(report)
    return {"peers": plot_peers, "functions": plot_cold_starts, "soak": plot_soak}[kind](report, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", type=Path, nargs="+", help="JSON reports of onnxfn bench / bench-events --soak")


def run(args: argparse.Namespace) -> int:
    code = 0
    for path in args.reports:
        try:
            written = plot(json.loads(path.read_text()), path)
        except (OSError, ValueError, KeyError) as exc:
            print(f"plot: {path}: {exc}", file=sys.stderr)
            code = 1
            continue
        for png in written:
            print(f"wrote {png}")
    return code
